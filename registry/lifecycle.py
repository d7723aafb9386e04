"""The lifecycle RPCs of RegistryService: assign versions to worker pools, drain them, and read their state from
the placements workers report (worker/lifecycle.py does the loading and unloading)."""

from __future__ import annotations

import time

from llmserve.admin.v1 import registry_pb2
from llmserve.common.errors import failed_precondition, invalid_argument, not_found
from llmserve.common.logs import get_logger
from llmserve.common.state.store import Store

log = get_logger(__name__)

S = registry_pb2.LifecycleState
DEFAULT_POOL = "default"


async def version_status(store: Store, version: str) -> registry_pb2.GetModelVersionStatusResponse:
    """A version's state over the live workers (placements go with a worker's lease):
    assigned somewhere: REFUSED if a worker refused it, READY once every worker of those pools reports it ready,
    else LOADING; drained (and assigned nowhere): RETIRED once no worker holds it, else DRAINING; neither: READY
    where a worker serves it from its config, else UNSPECIFIED."""
    assignments = await store.assignments.list()
    all_placements = await store.placements.list()
    placements = [p for p in all_placements if p.version == version]
    pools = [a.name for a in assignments if version in a.versions]
    draining = [a.name for a in assignments if version in a.draining]
    by_worker = {p.worker_id: p for p in placements}
    state: int
    if pools:
        members = {p.worker_id for p in all_placements if p.pool in pools or p.worker_id in pools}
        states = [by_worker[w].state if w in by_worker else S.LIFECYCLE_STATE_LOADING for w in members]
        if S.LIFECYCLE_STATE_REFUSED in states:
            state = S.LIFECYCLE_STATE_REFUSED
        elif states and all(s == S.LIFECYCLE_STATE_READY for s in states):
            state = S.LIFECYCLE_STATE_READY
        else:
            state = S.LIFECYCLE_STATE_LOADING
    elif draining:
        held = [p for p in placements if p.state != S.LIFECYCLE_STATE_RETIRED]
        state = S.LIFECYCLE_STATE_DRAINING if held else S.LIFECYCLE_STATE_RETIRED
    elif any(p.state == S.LIFECYCLE_STATE_READY for p in placements):
        state = S.LIFECYCLE_STATE_READY
    else:
        state = S.LIFECYCLE_STATE_UNSPECIFIED
    return registry_pb2.GetModelVersionStatusResponse(version=version, state=state,
                                                      placements=placements, pools=pools)


def state_name(state: int) -> str:
    return registry_pb2.LifecycleState.Name(state).removeprefix("LIFECYCLE_STATE_").lower()  # type: ignore[arg-type]


class LifecycleRpcs:
    """Mixed into RegistryServicer (which provides store, _version and check_name)."""

    store: Store

    async def _version(self, version: str) -> registry_pb2.ModelVersion:
        raise NotImplementedError

    async def _change_assignment(self, pool: str, version: str, serve: bool) -> registry_pb2.Assignment:
        from llmserve.registry.service import check_name
        check_name("pool", pool)
        while True:  # compare-and-swap on the assignment, so two concurrent changes both land
            found, revision = await self.store.assignments.get_with_revision(pool)
            assignment = found or registry_pb2.Assignment(name=pool)
            versions = [v for v in assignment.versions if v != version]
            draining = [v for v in assignment.draining if v != version]
            (versions if serve else draining).append(version)
            assignment.ClearField("versions")
            assignment.ClearField("draining")
            assignment.versions.extend(versions)
            assignment.draining.extend(draining)
            assignment.updated = int(time.time())
            if await self.store.assignments.put_if_unchanged(assignment, {pool: revision}):
                return assignment

    async def LoadModelVersion(self, request, context):
        if not request.version:
            raise invalid_argument("version is required: the registered version to load")
        v = await self._version(request.version)
        if v.base_version:
            raise invalid_argument(f"model version {v.version!r} is a LoRA adapter: it is served wherever its base "
                                   f"{v.base_version!r} is; load the base")
        if v.state == registry_pb2.MODEL_STATE_DISABLED:
            raise failed_precondition(f"model version {v.version!r} is disabled; enable it first")
        assignment = await self._change_assignment(request.pool or DEFAULT_POOL, v.version, serve=True)
        log.info("model version assigned", version=v.version, pool=assignment.name)
        return registry_pb2.LoadModelVersionResponse(assignment=assignment)

    async def DrainModelVersion(self, request, context):
        if not request.version:
            raise invalid_argument("version is required: the version to drain")
        await self._version(request.version)
        routed = [f"{a.name} ({t.weight} of {sum(x.weight for x in a.targets)})"
                  for a in await self.store.aliases.list() for t in a.targets if t.version == request.version]
        if routed:
            raise failed_precondition(f"model version {request.version!r} still takes traffic from alias(es) "
                                      f"{', '.join(routed)}; move their split off it first (SetAlias, or a "
                                      "rollout), then drain")
        assignment = await self._change_assignment(request.pool or DEFAULT_POOL, request.version, serve=False)
        log.info("model version draining", version=request.version, pool=assignment.name)
        return registry_pb2.DrainModelVersionResponse(assignment=assignment)

    async def GetModelVersionStatus(self, request, context):
        if not request.version:
            raise invalid_argument("version is required")
        if await self.store.versions.get(request.version) is None:
            raise not_found(f"model version {request.version!r} does not exist; ListModelVersions shows the "
                            "registered ones")
        return await version_status(self.store, request.version)

    async def ListAssignments(self, request, context):
        return registry_pb2.ListAssignmentsResponse(assignments=await self.store.assignments.list())

    async def check_routable(self, version: str, field: str) -> None:
        """An alias may send traffic only to a version that is ready wherever it is managed (SetAlias)."""
        status = await version_status(self.store, version)
        if status.state not in (S.LIFECYCLE_STATE_UNSPECIFIED, S.LIFECYCLE_STATE_READY):
            why = next((p.reason for p in status.placements if p.reason), "")
            raise failed_precondition(f"{field}: model version {version!r} is {state_name(status.state)}, not ready"
                                      f"{': ' + why if why else ''}; wait for it to be ready "
                                      "(GetModelVersionStatus) before routing to it")
