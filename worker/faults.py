"""Fault injection for drills (registry/faults/<version>, off unless set): a version's engine wrapped so that a
share of its requests fail with INTERNAL and each waits an added latency before its first output, as a bad release
would. The registry refuses to set faults in a production profile unless it is allowed."""

from __future__ import annotations

import asyncio
import random
import typing

import grpc

from llmserve.admin.v1 import registry_pb2
from llmserve.common.errors import ServiceError


class FaultyEngine:
    """Delegates everything to `engine`; generate() and embed() first apply the version's current faults."""

    def __init__(self, engine: typing.Any, version: str,
                 faults: typing.Callable[[str], registry_pb2.FaultInjection | None]):
        self._engine, self._version, self._faults = engine, version, faults

    def __getattr__(self, name: str) -> typing.Any:
        return getattr(self._engine, name)

    async def _inject(self, version: str) -> None:
        fault = self._faults(version)
        if fault is None:
            return
        if fault.added_latency_ms:
            await asyncio.sleep(fault.added_latency_ms / 1000)
        if fault.error_rate and random.random() < fault.error_rate:
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               f"injected fault: model version {version!r} fails {fault.error_rate:.0%} of "
                               "requests (a drill set with SetFaultInjection)")

    async def generate(self, request) -> typing.AsyncIterator[typing.Any]:
        await self._inject(getattr(request, "adapter", "") or self._version)  # adapters share their base's engine
        async for output in self._engine.generate(request):
            yield output

    async def embed(self, texts):
        await self._inject(self._version)
        return await self._engine.embed(texts)
