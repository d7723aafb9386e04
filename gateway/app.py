"""Gateway process: the public InferenceService in front of the schedulers."""

from __future__ import annotations

from llmserve.common import etcd, redisconn, tls
from llmserve.common.config import MeshConfig
from llmserve.common.logs import get_logger
from llmserve.common.server import Service
from llmserve.common.state.views import RegistryView
from llmserve.gateway.cache import ResponseCache
from llmserve.gateway.edge import ConcurrencyDefaults, Edge
from llmserve.gateway.experiments import ExperimentStats
from llmserve.gateway.journal import Journal
from llmserve.gateway.limits import Limiter
from llmserve.gateway.pipeline import Pipeline
from llmserve.gateway.scheduler_client import SchedulerClient
from llmserve.gateway.schedulers import SchedulerPool
from llmserve.gateway.service import InferenceServicer, inference_service_name
from llmserve.gateway.tokens import TokenCounter
from llmserve.inference.v1 import inference_pb2_grpc

log = get_logger(__name__)

TOKENIZER_WARM_TIMEOUT_S = 60.0


class GatewayApp:
    def __init__(self, config: MeshConfig):
        self.config = config
        cfg = config.gateway
        self.client = etcd.connect(config.etcd)
        self.view = RegistryView(self.client, config.etcd.prefix, watch_keys=True)
        self.redis = redisconn.connect(config.redis)  # accounting: limits, spend, usage
        self.cache_redis = redisconn.connect(config.redis, "cache")  # the response cache, disposable
        self.journal = Journal(cfg.journal_dir)
        self.schedulers = SchedulerPool(self.client, config.etcd.prefix,
                                        [cfg.scheduler_address, *cfg.scheduler_addresses], config.security,
                                        discover=cfg.discover_schedulers, cooldown_s=cfg.scheduler_cooldown_s,
                                        wait_s=cfg.scheduler_wait_s)
        self.tokens = TokenCounter()
        limiter = Limiter(self.redis, fail_open=cfg.limits_fail_open, journal=self.journal,
                          reservation_ttl_s=cfg.reservation_ttl_s, lease_s=cfg.concurrency_lease_s)
        concurrency = ConcurrencyDefaults(cfg.max_concurrent_requests_per_tenant, cfg.max_concurrent_requests_per_key,
                                          cfg.concurrency_lease_s)
        self.edge = Edge(self.view, limiter, self.redis, self.journal, reservation_ttl_s=cfg.reservation_ttl_s,
                         concurrency=concurrency)
        cache = ResponseCache(self.cache_redis, cfg.response_cache_ttl_s, cfg.response_cache_max_entry_bytes)
        scheduler = SchedulerClient(self.schedulers, config.security.mesh_token,
                                    max_failovers=cfg.max_scheduler_failovers)
        # A/B statistics per version and alias arm, summed over replicas in Redis (common/experiments.py).
        self.stats = ExperimentStats(self.redis, config.etcd.prefix)
        self.pipeline = pipeline = Pipeline(cfg, self.view, scheduler, cache, self.edge, self.tokens, self.stats)
        # A request the REST sidecar would refuse as too large is refused over gRPC too, before it is parsed.
        # Public: TLS when the mesh has it, client certificates only if asked for (clients bring API keys).
        self.service = Service("gateway", cfg.host, cfg.port, [inference_service_name()],
                               max_request_bytes=config.rest.max_body_bytes,
                               credentials=tls.server_credentials(config.security, "gateway",
                                                                  config.security.gateway_client_auth))
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(pipeline, self.view, self.edge), self.service.server)

    async def start(self) -> int:
        self.journal.open()  # what a predecessor could not confirm is replayed by the accounting loop
        await self.view.start()
        await self.schedulers.start()
        self.tokens.warm(self.view.versions.snapshot.values())
        # Listening only once the tokenizers are loaded: on a just-restarted replica, requests that need a token
        # count (budgets, token limits) waited seconds for them (bench/chaos.py) while another replica could serve.
        if not await self.tokens.wait_warm(TOKENIZER_WARM_TIMEOUT_S):
            log.warning("serving before every tokenizer is loaded", timeout_s=TOKENIZER_WARM_TIMEOUT_S)
        else:
            await self.pipeline.warm_grammars(self.view.versions.snapshot.values())
        self.edge.start()
        self.stats.start()
        return await self.service.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.service.stop(grace_s)
        await self.edge.stop()  # settles what the stopped streams left, flushes usage, closes the journal
        await self.stats.stop()
        await self.view.stop()
        await self.schedulers.stop()
        await self.redis.aclose()
        await self.cache_redis.aclose()
        await self.client.close()
