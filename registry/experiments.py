"""GetExperimentStats: the A/B figures the gateways sum in Redis (common/experiments.py), per version or per arm."""

from __future__ import annotations

from redis.exceptions import RedisError

from llmserve.admin.v1 import registry_pb2
from llmserve.common import experiments
from llmserve.common.errors import invalid_argument, not_found, unavailable
from llmserve.common.state.store import Store


async def alias_arms(redis, prefix: str, alias: registry_pb2.Alias | None, name: str) -> list[registry_pb2.ArmStats]:
    """One ArmStats per arm of the alias's split (zeros before any traffic), then per version it sent traffic to
    earlier (weight 0)."""
    counters = await experiments.read_arms(redis, prefix, name)
    weights = {t.version: t.weight for t in alias.targets} if alias is not None else {}
    order = list(weights) + sorted(v for v in counters if v not in weights)
    return [experiments.arm_stats(counters.get(v, {}), v, name, weights.get(v, 0)) for v in order]


class ExperimentRpcs:
    """Mixed into RegistryServicer (which provides store, redis and prefix)."""

    store: Store
    redis: object
    prefix: str

    async def GetExperimentStats(self, request, context):
        if bool(request.alias) == bool(request.version):
            raise invalid_argument("give exactly one of alias (every arm of its split) and version (its own figures)")
        try:
            if request.version:
                if await self.store.versions.get(request.version) is None:
                    raise not_found(f"model version {request.version!r} does not exist")
                counters = await experiments.read(self.redis, experiments.version_key(self.prefix, request.version))
                arms = [experiments.arm_stats(counters, request.version)]
            else:
                alias = await self.store.aliases.get(request.alias)
                arms = await alias_arms(self.redis, self.prefix, alias, request.alias)
                if alias is None and not arms:
                    raise not_found(f"alias {request.alias!r} does not exist and has no statistics")
        except (RedisError, OSError) as exc:
            raise unavailable(f"the statistics store (Redis) cannot be read: {type(exc).__name__}; retry") from None
        return registry_pb2.GetExperimentStatsResponse(arms=arms, method=experiments.METHOD)
