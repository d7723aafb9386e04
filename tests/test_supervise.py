"""The launcher's supervision of real child processes: restart delays grow for a crash loop and start over for
a child that had been running for a while."""

from __future__ import annotations

import threading
import time

import pytest

from llmserve.clients.launcher import Child, Launcher


@pytest.fixture
def launcher(tmp_path):
    (tmp_path / "llmserve.yaml").write_text("log:\n  level: info\n")
    launcher = Launcher(str(tmp_path / "llmserve.yaml"), "", str(tmp_path / "state"))
    (launcher.state / "logs").mkdir(parents=True)
    thread = threading.Thread(target=launcher.supervise, daemon=True)
    yield launcher, thread
    launcher.stopping = True
    thread.join(5)
    for child in launcher.children:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def _spawn(launcher: Launcher, name: str, script: str, restarts: int) -> Child:
    child = Child(name, ["sh", "-c", script], launcher.state / "logs" / f"{name}.log", restarts=restarts)
    launcher._spawn(child)
    return child


def test_a_child_that_ran_long_enough_restarts_after_one_second_again(launcher):
    """Five earlier crashes (long ago) must not make the sixth wait 30 s: that was a stale crash loop."""
    launcher, thread = launcher
    launcher.backoff_reset_s = 0.5
    child = _spawn(launcher, "steady", "sleep 0.8; exit 3", restarts=5)
    first = child.proc.pid
    thread.start()
    child.proc.wait()
    died = time.monotonic()
    while child.proc.pid == first:
        assert time.monotonic() - died < 3, "not restarted within 3 s"
        time.sleep(0.05)
    assert child.restarts == 1


def test_a_crash_loop_backs_off(launcher):
    launcher, thread = launcher
    child = _spawn(launcher, "looping", "exit 3", restarts=0)
    thread.start()
    started = time.monotonic()
    while not (child.restarts == 2 and child.next_restart):  # restarted after 1 s, then 2 s, and died again
        assert time.monotonic() - started < 8
        time.sleep(0.02)
    assert 3 < child.next_restart - time.monotonic() <= 4  # the third waits 4 s
    assert 2.5 < time.monotonic() - started < 5
