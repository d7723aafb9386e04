"""RegistryService: validated writes of model versions and aliases to etcd."""

from __future__ import annotations

import re
import time

from llmserve.admin.v1 import registry_pb2, registry_pb2_grpc
from llmserve.common.config import RegistryConfig
from llmserve.common.errors import ServiceError, already_exists, failed_precondition, invalid_argument, not_found
from llmserve.common.logs import get_logger
from llmserve.common.state.store import Store
from llmserve.common.tokenizers import TOKENIZER_SOURCE_LABEL, tokenizer_source
from llmserve.registry.experiments import ExperimentRpcs
from llmserve.registry.faults import FaultRpcs
from llmserve.registry.lifecycle import LifecycleRpcs
from llmserve.registry.rollout import RolloutRpcs

log = get_logger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")  # whole names only (fullmatch: "$" admits "a\n")
ENGINES = ("torch", "tensorrt_llm")


def check_name(field: str, value: str) -> None:
    if not NAME_RE.fullmatch(value):
        raise invalid_argument(
            f"{field}={value!r} is invalid: use 1-128 lowercase letters, digits, '.', '_' or '-', starting with a "
            "letter or digit")


QUANTIZATIONS = ("", "int8")  # what worker/engine/paged/model_runner.py computes


def validate_version(v: registry_pb2.ModelVersion) -> registry_pb2.ModelVersion:
    v = registry_pb2.ModelVersion.FromString(v.SerializeToString())
    check_name("model_version.version", v.version)
    check_name("model_version.family", v.family)
    if v.kind == registry_pb2.MODEL_KIND_UNSPECIFIED:
        raise invalid_argument("model_version.kind is required: MODEL_KIND_GENERATE or MODEL_KIND_EMBED")
    v.engine = v.engine or "torch"
    if v.engine not in ENGINES:
        raise invalid_argument(f"model_version.engine={v.engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if not v.weights_source:
        raise invalid_argument("model_version.weights_source is required (pkg:<module>/<path>, file:<path>)")
    if v.context_length < 1:
        raise invalid_argument(f"model_version.context_length={v.context_length} must be >= 1")
    for field in ("price_per_1k_prompt_tokens", "price_per_1k_completion_tokens"):
        if getattr(v, field) < 0:
            raise invalid_argument(f"model_version.{field}={getattr(v, field)} must be >= 0")
    if v.max_batch_size < 0 or v.max_wait_ms < 0:
        raise invalid_argument("model_version.max_batch_size and max_wait_ms must be >= 0 (0: default)")
    if v.quantization not in QUANTIZATIONS:
        raise invalid_argument(f"model_version.quantization={v.quantization!r} is unknown; use one of "
                               f"{', '.join(repr(q) for q in QUANTIZATIONS)}")
    if v.base_version:
        check_name("model_version.base_version", v.base_version)
        if v.kind != registry_pb2.MODEL_KIND_GENERATE or v.engine != "torch" or v.quantization:
            raise invalid_argument("an adapter (model_version.base_version set) is a torch generation model without "
                                   "quantization of its own: it runs on its base's weights")
    if v.quantization and (v.engine != "torch" or v.kind != registry_pb2.MODEL_KIND_GENERATE):
        raise invalid_argument(f"model_version.quantization={v.quantization!r} applies to generation models on the "
                               f"torch engine only; this version is {v.engine!r} and kind "
                               f"{registry_pb2.ModelKind.Name(v.kind)}")
    v.max_batch_size = v.max_batch_size or 32
    v.max_wait_ms = v.max_wait_ms or 5
    v.state = v.state or registry_pb2.MODEL_STATE_ACTIVE
    return v


class RegistryServicer(LifecycleRpcs, ExperimentRpcs, RolloutRpcs, FaultRpcs,
                       registry_pb2_grpc.RegistryServiceServicer):
    """Versions and aliases here; lifecycle, experiments, rollouts and faults in their modules (mixins)."""

    def __init__(self, store: Store, redis=None, prefix: str = "", config: RegistryConfig | None = None):
        self.store = store
        self.redis, self.prefix = redis, prefix  # A/B statistics (Redis) of this mesh (its etcd prefix)
        self.config = config or RegistryConfig()

    async def _version(self, version: str) -> registry_pb2.ModelVersion:
        found = await self.store.versions.get(version)
        if found is None:
            raise not_found(f"model version {version!r} does not exist; ListModelVersions shows the registered ones")
        return found

    async def CreateModelVersion(self, request, context):
        v = validate_version(request.model_version)
        if v.base_version:
            base = await self.store.versions.get(v.base_version)
            if base is None:
                raise invalid_argument(f"model_version.base_version={v.base_version!r} is not registered; register "
                                       "the base model first")
            if base.base_version or base.kind != registry_pb2.MODEL_KIND_GENERATE or base.engine != "torch":
                raise invalid_argument(f"model_version.base_version={v.base_version!r} cannot carry adapters: it "
                                       "must be a torch generation model that is not an adapter itself")
            # The adapter speaks its base's vocabulary: whoever tokenizes for it (gateway, worker) loads the base's.
            if TOKENIZER_SOURCE_LABEL not in v.labels:
                v.labels[TOKENIZER_SOURCE_LABEL] = tokenizer_source(base)
        v.created = int(time.time())
        if not await self.store.versions.create(v):
            existing = await self._version(v.version)
            same = registry_pb2.ModelVersion.FromString(existing.SerializeToString())
            same.created = v.created
            if request.allow_existing and same == v:
                return registry_pb2.CreateModelVersionResponse(model_version=existing)
            raise already_exists(f"model version {v.version!r} already exists; versions are immutable, register a "
                                 "new version id instead")
        log.info("model version created", version=v.version, kind=registry_pb2.ModelKind.Name(v.kind))
        return registry_pb2.CreateModelVersionResponse(model_version=v)

    async def GetModelVersion(self, request, context):
        return registry_pb2.GetModelVersionResponse(model_version=await self._version(request.version))

    async def ListModelVersions(self, request, context):
        versions = [v for v in await self.store.versions.list() if not request.family or v.family == request.family]
        return registry_pb2.ListModelVersionsResponse(model_versions=versions)

    async def UpdateModelVersionState(self, request, context):
        if request.state == registry_pb2.MODEL_STATE_UNSPECIFIED:
            raise invalid_argument("state is required: MODEL_STATE_ACTIVE or MODEL_STATE_DISABLED")
        v = await self._version(request.version)
        v.state = request.state
        await self.store.versions.put(v)
        log.info("model version state changed", version=v.version, state=registry_pb2.ModelState.Name(v.state))
        return registry_pb2.UpdateModelVersionStateResponse(model_version=v)

    async def DeleteModelVersion(self, request, context):
        await self._version(request.version)
        users = [a.name for a in await self.store.aliases.list()
                 if any(t.version == request.version for t in a.targets)]
        if users:
            raise failed_precondition(f"model version {request.version!r} is routed to by alias(es) "
                                      f"{', '.join(users)}; change their split first")
        await self.store.versions.delete(request.version)
        return registry_pb2.DeleteModelVersionResponse()

    async def SetAlias(self, request, context):
        alias = registry_pb2.Alias.FromString(request.alias.SerializeToString())
        check_name("alias.name", alias.name)
        if not alias.targets:
            raise invalid_argument("alias.targets needs at least one {version, weight}")
        if await self.store.versions.get(alias.name) is not None:
            raise invalid_argument(f"alias.name={alias.name!r} is already a model version id; pick another name")
        kinds = set()
        seen = set()
        for i, target in enumerate(alias.targets):
            if target.weight < 1:
                raise invalid_argument(f"alias.targets[{i}].weight={target.weight} must be >= 1")
            if target.version in seen:
                raise invalid_argument(f"alias.targets[{i}].version={target.version!r} appears twice")
            seen.add(target.version)
            try:
                kinds.add((await self._version(target.version)).kind)
            except ServiceError as exc:
                raise invalid_argument(f"alias.targets[{i}]: {exc.message}") from None
            await self.check_routable(target.version, f"alias.targets[{i}]")
        if len(kinds) > 1:
            raise invalid_argument("alias.targets mix generation and embedding versions; an alias routes one kind")
        alias.updated = int(time.time())
        await self.store.aliases.put(alias)
        log.info("alias set", alias=alias.name, targets={t.version: t.weight for t in alias.targets})
        return registry_pb2.SetAliasResponse(alias=alias)

    async def GetAlias(self, request, context):
        alias = await self.store.aliases.get(request.name)
        if alias is None:
            raise not_found(f"alias {request.name!r} does not exist; ListAliases shows the defined ones")
        return registry_pb2.GetAliasResponse(alias=alias)

    async def ListAliases(self, request, context):
        return registry_pb2.ListAliasesResponse(aliases=await self.store.aliases.list())

    async def DeleteAlias(self, request, context):
        if await self.store.aliases.get(request.name) is None:
            raise not_found(f"alias {request.name!r} does not exist")
        await self.store.aliases.delete(request.name)
        return registry_pb2.DeleteAliasResponse()


def registry_service_name() -> str:
    return registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


__all__ = ["RegistryServicer", "registry_service_name", "validate_version"]
