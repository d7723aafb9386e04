"""SetFaultInjection: per-version faults for drills (worker/faults.py applies them), off unless set, and refused
in a production profile unless registry.allow_fault_injection."""

from __future__ import annotations

import math

from llmserve.admin.v1 import registry_pb2
from llmserve.common.config import RegistryConfig
from llmserve.common.errors import failed_precondition, invalid_argument, not_found
from llmserve.common.logs import get_logger
from llmserve.common.state.store import Store

log = get_logger(__name__)

MAX_ADDED_LATENCY_MS = 60_000


class FaultRpcs:
    """Mixed into RegistryServicer (store, config)."""

    store: Store
    config: RegistryConfig

    async def SetFaultInjection(self, request, context):
        fault = registry_pb2.FaultInjection.FromString(request.fault.SerializeToString())
        if await self.store.versions.get(fault.version) is None:
            raise not_found(f"fault.version={fault.version!r} is not a registered model version")
        if not (math.isfinite(fault.error_rate) and 0 <= fault.error_rate <= 1):
            raise invalid_argument(f"fault.error_rate={fault.error_rate} must be in [0, 1]")
        if fault.added_latency_ms > MAX_ADDED_LATENCY_MS:
            raise invalid_argument(f"fault.added_latency_ms={fault.added_latency_ms} must be at most "
                                   f"{MAX_ADDED_LATENCY_MS}")
        clearing = not fault.error_rate and not fault.added_latency_ms
        if not clearing and self.config.profile == "production" and not self.config.allow_fault_injection:
            raise failed_precondition("fault injection is off in the production profile (registry.profile="
                                      "production); set registry.allow_fault_injection to run a drill there")
        if clearing:
            await self.store.faults.delete(fault.version)
        else:
            await self.store.faults.put(fault)
        log.warning("fault injection set", version=fault.version, error_rate=fault.error_rate,
                    added_latency_ms=fault.added_latency_ms)
        return registry_pb2.SetFaultInjectionResponse(fault=fault)
