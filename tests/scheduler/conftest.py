"""Fixtures of the dispatcher's tests: Harness instances (tests/scheduler/test_dispatcher.py), started and stopped."""

from __future__ import annotations

import pytest

from tests.scheduler.test_dispatcher import Harness


@pytest.fixture
async def make():
    """make(**Dispatcher kwargs) -> a started Harness; all are stopped at the end of the test."""
    made: list[Harness] = []

    def build(**kwargs) -> Harness:
        h = Harness(**kwargs)
        h.dispatcher.start()
        made.append(h)
        return h

    yield build
    for h in made:
        await h.dispatcher.stop()
