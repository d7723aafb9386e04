"""Typed configuration for every service: defaults <- YAML file <- environment (LLMSERVE_<SECTION>__<FIELD>).

Read only at entry points (`python -m llmserve.<service>`, the launcher, the CLI); services receive the dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import typing
from dataclasses import dataclass, field

import yaml

ENV_PREFIX = "LLMSERVE_"


@dataclass
class EtcdConfig:
    host: str = "127.0.0.1"  # etcd client host
    port: int = 2379  # etcd client port
    prefix: str = "/llmserve"  # every key of this mesh lives under it
    timeout_s: float = 3.0  # per-call timeout
    # etcd with authentication enabled: a user and password (the token is renewed as it lapses: common/etcd.py) ...
    username: str = ""  # etcd user; empty: no user
    password: str = ""  # its password (set it from a Secret: LLMSERVE_ETCD__PASSWORD)
    # ... or TLS with client certificates (etcd --client-cert-auth takes the certificate's common name as the user)
    ca_file: str = ""  # the CA of etcd's certificate (PEM); set: TLS to etcd, else plaintext
    cert_file: str = ""  # this client's certificate (PEM), when etcd requires one
    key_file: str = ""  # its private key (PEM)

    def validate(self) -> None:
        if bool(self.username) != bool(self.password):
            raise ValueError("etcd.username and etcd.password go together: set both or neither")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("etcd.cert_file and etcd.key_file go together: set both or neither")
        if self.cert_file and not self.ca_file:
            raise ValueError("etcd.cert_file needs etcd.ca_file (client certificates travel over TLS only)")


@dataclass
class RedisConfig:
    # Accounting: rate-limit windows, budget reservations and spend, usage. Run it without eviction and with
    # persistence (noeviction + AOF): losing it loses money. Gateways journal what it does not confirm.
    url: str = "redis://127.0.0.1:6379/0"
    # The response cache: disposable (an LRU Redis may evict it, losing it costs only hits). Empty: `url`.
    cache_url: str = ""
    timeout_s: float = 0.25  # per-call timeout; past it the call counts as a Redis failure
    max_connections: int = 64  # connection pool size (a blocking pool: callers wait, never fail)


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"  # listen address of the public gRPC API
    port: int = 50051  # public gRPC port
    metrics_port: int = 9400  # Prometheus /metrics (0 disables it)
    scheduler_address: str = "127.0.0.1:50052"  # where the scheduler listens
    # Scheduler replicas (gateway/schedulers.py): the gateway spreads tasks over scheduler_address, the addresses
    # listed here, and (discover_schedulers) every scheduler registered in etcd, picking per task the one with the
    # fewest tasks in flight among the healthy (channel READY, no failure in the last scheduler_cooldown_s).
    scheduler_addresses: list[str] = field(default_factory=list)
    discover_schedulers: bool = True
    scheduler_cooldown_s: float = 2.0
    # A task whose scheduler fails it (UNAVAILABLE: dead, unreachable, shutting down, no worker yet) moves to another
    # one, at most this many times: started over when nothing of it reached the gateway yet, else resumed from the
    # tokens already sent (as the scheduler migrates a stream off a lost worker); 0: never.
    max_scheduler_failovers: int = 2
    # A request that finds no scheduler reachable (restarting) waits this long for one (at most its deadline)
    # before UNAVAILABLE; 0: fail at once.
    scheduler_wait_s: float = 10.0
    response_cache_ttl_s: int = 3600  # lifetime of a cached deterministic response
    default_completion_max_tokens: int = 16  # max_tokens when a completion request has none (as OpenAI)
    default_chat_max_tokens: int = 256  # max_tokens when a chat request has none
    max_n: int = 16  # largest `n`
    max_prompts: int = 64  # largest batch of prompts in one completion request
    max_sequences_per_request: int = 128  # largest prompts x n of one completion request
    max_embedding_inputs: int = 2048  # largest batch of texts in one embeddings request
    max_stop: int = 4  # most stop strings
    max_stop_length: int = 256  # longest stop string, in characters
    max_messages: int = 1024  # most messages in one chat request
    max_model_length: int = 128  # longest `model` (registry names are at most 128 characters)
    max_user_length: int = 256  # longest `user`
    # A prompt (a conversation's text, an embeddings input) over context_length x this many UTF-8 bytes cannot fit
    # the model's context and is refused before it is tokenized; no served tokenizer has a token over 81 bytes.
    max_prompt_bytes_per_token: int = 128
    response_cache_max_entry_bytes: int = 1024 * 1024  # larger responses are not written to the response cache
    # Redis unreachable: admit without request and token limits (true) or refuse (false). Budgets always fail
    # closed: a tenant with a budget is refused (UNAVAILABLE) while its spend cannot be checked.
    limits_fail_open: bool = True
    # Accounting operations Redis did not confirm (settlements, usage flushes) are appended here, durably, and
    # replayed once it answers; one file per running gateway, adopted by the next gateway that starts.
    journal_dir: str = ".llmserve/journal"
    # A budget reservation expires this long after its last renewal (the gateway renews those of running
    # requests every third of it); the reaper then releases the reservations of a gateway that died.
    reservation_ttl_s: float = 60.0
    # Concurrency caps, exact across gateway replicas (Redis): sequences (prompts x n; an embeddings call is one)
    # a tenant may have running at once when its Tenant.max_concurrent_requests is 0, and the same per API key
    # whose ApiKey.max_concurrent_requests is 0; 0 here: no cap. Beyond: RESOURCE_EXHAUSTED (REST 429).
    max_concurrent_requests_per_tenant: int = 64
    max_concurrent_requests_per_key: int = 0
    # A running request's slot expires this long after its last renewal (the gateway renews every third of it),
    # so the slots of a gateway that died are free again within this time.
    concurrency_lease_s: float = 15.0
    # `llmserve run` starts one more gateway process per port listed here (same settings, same scheduler and
    # journal directory; their metrics on free ports it prints), so a client balancing over all of them keeps
    # being served when one dies.
    replica_ports: list[int] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("max_n", "max_prompts", "max_sequences_per_request", "max_embedding_inputs", "max_stop_length",
                     "max_messages", "max_model_length", "max_user_length", "max_prompt_bytes_per_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"gateway.{name}={getattr(self, name)} must be >= 1")
        for name in ("reservation_ttl_s", "concurrency_lease_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"gateway.{name}={getattr(self, name)} must be > 0")
        if not self.journal_dir:
            raise ValueError("gateway.journal_dir must name a directory")
        ports = [self.port, *self.replica_ports]
        if any(not 0 < p <= 65535 for p in self.replica_ports) or len(set(ports)) < len(ports):
            raise ValueError(f"gateway.replica_ports={self.replica_ports} must be distinct ports in [1, 65535], "
                             f"none of them gateway.port={self.port}")
        for address in [self.scheduler_address, *self.scheduler_addresses]:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValueError(f"gateway scheduler address {address!r} must be host:port "
                                 "(gateway.scheduler_address, gateway.scheduler_addresses)")
        for name in ("max_stop", "response_cache_max_entry_bytes", "max_concurrent_requests_per_tenant",
                     "max_concurrent_requests_per_key", "max_scheduler_failovers", "scheduler_cooldown_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"gateway.{name}={getattr(self, name)} must be >= 0")


@dataclass
class SchedulerConfig:
    host: str = "127.0.0.1"  # listen address
    port: int = 50052  # gRPC port
    metrics_port: int = 9401  # Prometheus /metrics (0 disables it)
    max_queue_per_model: int = 4096  # queued tasks per model beyond which new ones get RESOURCE_EXHAUSTED
    # A waiting task climbs one priority class per this many seconds, so none starves: a batch task outranks fresh
    # interactive ones for a free slot after 3x this, and is no longer preempted by them after 2x. Slow next to the
    # queue waits batch traffic has (seconds), or old batch tasks would outrank interactive ones under any backlog.
    aging_s: float = 15.0
    max_backlog_per_request: int = 1024  # outputs buffered for a caller that is not reading; beyond: cancelled
    slow_consumer_timeout_s: float = 30.0  # a caller with unread outputs this long is cancelled (worker freed)
    # A model whose last worker went away (crashed, restarting) less than this long ago keeps taking tasks: they
    # wait in its queue for a worker to come back, up to their deadlines, instead of failing at once; past it,
    # and for a model no worker ever served, UNAVAILABLE at once. 0: never wait.
    worker_wait_s: float = 30.0
    # How a task picks among the workers with room for it: "kv" (KV-aware), "least_loaded" or "round_robin".
    # kv scores each candidate
    #   score = kv_hit_weight * hit - kv_load_weight * load - kv_pressure_weight * pressure
    #           - kv_prefill_weight * prefill
    # where hit is the share of the prompt's cacheable blocks (full blocks before its last token) that the
    # worker's prefix cache holds from the start (its KV events),
    # load is (running + waiting) / max_num_seqs (the larger of the worker's last report and the scheduler's own
    # count), pressure the share of its KV blocks in use (last report), and prefill the prompt tokens (in
    # thousands) the worker would compute before this task's first token: what it was sent and has not answered
    # yet plus this prompt's uncached part. The highest score wins, ties go to the least loaded. With the defaults
    # a worker holding the whole prefix loses to an idle one once its load passes 2/3, or once about 1,000 more
    # prompt tokens wait on it than the idle one would compute. Prompts without token ids (the gateway did not
    # count them) score on load alone.
    routing: str = "kv"
    kv_hit_weight: float = 1.0
    kv_load_weight: float = 1.5
    kv_pressure_weight: float = 0.5
    kv_prefill_weight: float = 1.0
    # A generation stream whose worker is lost (its stream breaks, its registration lapses) is resumed on another
    # worker serving the same version, from the prompt and the tokens already sent, at most this many times per
    # request (0: never; the request then fails UNAVAILABLE saying why).
    max_migrations: int = 2
    # Registration in etcd (schedulers/<scheduler_id>), which gateways watch: the id (default "<hostname>-<port>"),
    # the address gateways dial (default host:port; a scheduler on 0.0.0.0 without one does not register, gateways
    # reach it at their configured addresses) and the lease, refreshed every third of it.
    scheduler_id: str = ""
    advertise_address: str = ""
    lease_ttl_s: int = 5
    # A worker silent this long (no output, no load report: they come every worker.load_report_interval_s) gets no
    # new tasks until it speaks again (hung, not dead; a dead one leaves when its stream breaks or lease expires).
    worker_silence_s: float = 5.0
    # Priorities across the mesh. With preemption on, a task finding no free slot may take one that a lower class
    # holds on a worker: the scheduler sends it there and the worker's engine preempts the lower-class sequence
    # (it recomputes later from its cached blocks, with the same output). Free slots still go by aging_s.
    preemption: bool = True
    # Queued tasks per model and class (interactive, standard, batch) beyond which that class's new tasks get
    # RESOURCE_EXHAUSTED; 0 or missing: only max_queue_per_model. A task with a deadline is refused at once
    # (RESOURCE_EXHAUSTED, saying why) when the tasks ahead of it, at the rate its model's tasks finished over the
    # last 30 s, would take longer than the time it has left.
    max_queue_per_class: list[int] = field(default_factory=lambda: [512, 2048, 4096])

    def validate(self) -> None:
        if len(self.max_queue_per_class) > 3 or any(c < 0 for c in self.max_queue_per_class):
            raise ValueError(f"scheduler.max_queue_per_class={self.max_queue_per_class} must be at most 3 counts "
                             "(interactive, standard, batch), each >= 0")
        if self.routing not in ("kv", "least_loaded", "round_robin"):
            raise ValueError(f"scheduler.routing={self.routing!r} must be kv, least_loaded or round_robin")
        for name in ("kv_hit_weight", "kv_load_weight", "kv_pressure_weight", "kv_prefill_weight", "max_migrations"):
            if getattr(self, name) < 0:
                raise ValueError(f"scheduler.{name}={getattr(self, name)} must be >= 0")
        if self.worker_silence_s <= 0:
            raise ValueError(f"scheduler.worker_silence_s={self.worker_silence_s} must be > 0")
        if self.lease_ttl_s < 2:
            raise ValueError(f"scheduler.lease_ttl_s={self.lease_ttl_s} must be >= 2")


@dataclass
class WorkerConfig:
    host: str = "127.0.0.1"  # listen address
    port: int = 50061  # gRPC port
    metrics_port: int = 9402  # Prometheus /metrics (0 disables it)
    worker_id: str = ""  # unique id; default "<hostname>-<port>"
    advertise_address: str = ""  # address the scheduler dials; default host:port
    models: list[str] = field(default_factory=list)  # registry versions this worker serves
    model_cache_dir: str = ".llmserve/models"  # de-quantized weights are cached here
    device: str = "cpu"  # torch device ("cpu", "cuda", "cuda:1")
    dtype: str = "auto"  # torch dtype of generation models: float32, bfloat16, float16, or auto (bf16 on CUDA and
    # on CPUs with AMX, else float32)
    quantization: str = ""  # "" (none) or "int8": int8 weight-only linears for small batches (bf16 activations)
    max_num_seqs: int = 32  # sequences batched together per generation model (32 mixed requests: +11% tokens/s over 16)
    max_num_batched_tokens: int = 512  # tokens computed per engine step (prompt chunks + decodes)
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int = 0  # KV-cache blocks per generation model; 0: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.05  # share of free (GPU, else host) memory for the KV cache when num_kv_blocks=0
    enable_prefix_caching: bool = True  # reuse KV blocks of shared prompt prefixes across requests
    # LoRA adapters (registry versions with base_version): a worker serves every active adapter of the bases it
    # serves, loaded and dropped at run time as the registry changes; at most max_adapters resident per engine
    # (least recently used idle ones make room), rank at most max_lora_rank.
    serve_adapters: bool = True
    max_adapters: int = 8
    max_lora_rank: int = 64
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    lease_ttl_s: int = 5  # registration lease in etcd; refreshed every third of it
    load_report_interval_s: float = 1.0  # periodic load report on each scheduler stream
    # Back-pressure on a scheduler stream that stops reading (a hung scheduler, a stalled network): outputs wait in
    # a queue of at most this many messages; a task whose output cannot be queued for stalled_stream_timeout_s is
    # cancelled, freeing its engine slots, instead of generating for nobody.
    max_outbox_messages: int = 4096
    stalled_stream_timeout_s: float = 30.0
    # Model lifecycle (worker/lifecycle.py): the registry's assignment of this pool (and of this worker's id) adds
    # versions to worker.models at run time and drains them. A version is loaded only if its estimated memory
    # (weights + KV cache) fits in free memory and in memory_budget_bytes (0: no budget) beside what is loaded.
    pool: str = "default"
    memory_budget_bytes: int = 0
    drain_settle_s: float = 1.0  # a draining version's engine must stay idle this long before each drain step
    drain_timeout_s: float = 120.0  # longest wait for a draining version's requests before it is unloaded anyway


@dataclass
class LaunchConfig:
    """What `llmserve run` starts on this machine (the services' own settings are in their sections)."""
    # Worker processes. Worker i (0-based) listens on worker_ports[i], else worker.port + i, with its metrics on a
    # free port (worker 0 keeps worker.metrics_port), and serves worker_models[i], else worker.models.
    workers: int = 1
    worker_ports: list[int] = field(default_factory=list)
    # Per-worker model sets, one entry per worker, versions separated by spaces ("a b,c": worker 0 serves a and b,
    # worker 1 serves c); a missing or empty entry means worker.models.
    worker_models: list[str] = field(default_factory=list)
    # Gateway processes behind one listening address, gateway.host:gateway.port: with more than 1, HAProxy listens
    # there and balances over the gateways, each on launch.gateway_ports[i] (else a free port) on loopback.
    gateways: int = 1
    gateway_ports: list[int] = field(default_factory=list)
    # Scheduler processes (replicas: gateways spread tasks over them and fail over). Scheduler i listens on
    # scheduler_ports[i], else scheduler 0 on scheduler.port and the others on free ports (scheduler.port + 1 is
    # registry.port's default); scheduler 0 keeps scheduler.metrics_port, the others' metrics go on free ports.
    schedulers: int = 1
    scheduler_ports: list[int] = field(default_factory=list)

    def validate(self, worker_port: int) -> None:
        if self.workers < 1:
            raise ValueError(f"launch.workers={self.workers} must be >= 1")
        if self.schedulers < 1 or len(self.scheduler_ports) > self.schedulers:
            raise ValueError(f"launch.schedulers={self.schedulers} must be >= 1, with at most that many "
                             f"launch.scheduler_ports ({len(self.scheduler_ports)})")
        taken = set(self.ports(worker_port)) | set(self.gateway_ports)
        if (any(not 0 < p <= 65535 for p in self.scheduler_ports)
                or len(set(self.scheduler_ports)) < len(self.scheduler_ports) or taken & set(self.scheduler_ports)):
            raise ValueError(f"launch.scheduler_ports={self.scheduler_ports} must be distinct ports in [1, 65535], "
                             "none of them a worker's or a gateway's")
        if self.gateways < 1 or len(self.gateway_ports) > self.gateways:
            raise ValueError(f"launch.gateways={self.gateways} must be >= 1, with at most that many "
                             f"launch.gateway_ports ({len(self.gateway_ports)})")
        if any(not 0 < p <= 65535 for p in self.gateway_ports) or len(set(self.gateway_ports)) < len(
                self.gateway_ports):
            raise ValueError(f"launch.gateway_ports={self.gateway_ports} must be distinct ports in [1, 65535]")
        if len(self.worker_ports) > self.workers or len(self.worker_models) > self.workers:
            raise ValueError(f"launch.worker_ports ({len(self.worker_ports)}) and launch.worker_models "
                             f"({len(self.worker_models)}) have at most launch.workers={self.workers} entries")
        ports = self.ports(worker_port)
        if any(not 0 < p <= 65535 for p in ports) or len(set(ports)) < len(ports):
            raise ValueError(f"the workers' ports {ports} must be distinct ports in [1, 65535] "
                             "(launch.worker_ports, else worker.port + i)")

    def ports(self, worker_port: int) -> list[int]:
        return [self.worker_ports[i] if i < len(self.worker_ports) else worker_port + i for i in range(self.workers)]

    def models(self, i: int, default: list[str]) -> list[str]:
        entry = self.worker_models[i].split() if i < len(self.worker_models) else []
        return entry or list(default)


@dataclass
class RegistryConfig:
    host: str = "127.0.0.1"  # listen address of the admin service
    port: int = 50053  # gRPC port
    metrics_port: int = 9403  # Prometheus /metrics (0 disables it)
    # "production" refuses fault injection (SetFaultInjection) unless allow_fault_injection; other profiles allow it.
    profile: str = "development"
    allow_fault_injection: bool = False
    # The rollout controller (registry/rollout.py): one replica at a time holds its etcd lease and acts.
    controller: bool = True  # run the controller in this registry process
    controller_tick_s: float = 1.0  # how often the leader evaluates rollouts
    controller_lease_ttl_s: int = 5  # leadership lease; a stopped leader is replaced within it


@dataclass
class RestConfig:
    host: str = "127.0.0.1"  # listen address of the OpenAI-compatible REST sidecar (grpc-gateway)
    port: int = 8080  # REST port (0: do not start the sidecar)
    gateway_address: str = "127.0.0.1:50051"  # the gRPC gateway it transcodes to
    # Larger request bodies get 413; the gateway refuses larger gRPC requests too (INVALID_ARGUMENT, unparsed).
    max_body_bytes: int = 4 * 1024 * 1024
    # What one client can hold (slowloris and the like). Timeouts in seconds, 0: none. Requests to /v1/* without
    # an `Authorization: Bearer <token>` header get 401 before their body is read (the gateway checks the key).
    read_header_timeout_s: float = 10.0  # headers must arrive within this, from their first byte
    read_timeout_s: float = 60.0  # the whole request, headers and body, must arrive within this
    # Per write, not per response: each write (a JSON body, one stream event) must complete within this, so a
    # client that stops reading is cut off while a stream that is read lasts as long as generation does.
    write_timeout_s: float = 60.0
    idle_timeout_s: float = 120.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 64 * 1024  # larger request headers get 431
    # Requests in flight at once (streams included, /health not); beyond it 503 with Retry-After. 0: no limit.
    max_concurrent_requests: int = 256
    binary: str = "deploy/rest/bin/llmserve-rest"  # built by `make rest` (part of `make install`)

    def validate(self) -> None:
        for name in ("read_header_timeout_s", "read_timeout_s", "write_timeout_s", "idle_timeout_s",
                     "max_concurrent_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"rest.{name}={getattr(self, name)} must be >= 0 (0: no limit)")
        for name in ("max_body_bytes", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"rest.{name}={getattr(self, name)} must be >= 1")

    def flags(self) -> list[str]:
        """The sidecar binary's command-line flags for these settings (listen address and gateway aside)."""
        def ms(seconds: float) -> str:  # Go durations; never an exponent
            return f"{round(seconds * 1000)}ms"
        return ["--max-body-bytes", str(self.max_body_bytes),
                "--read-header-timeout", ms(self.read_header_timeout_s), "--read-timeout", ms(self.read_timeout_s),
                "--write-timeout", ms(self.write_timeout_s), "--idle-timeout", ms(self.idle_timeout_s),
                "--max-header-bytes", str(self.max_header_bytes),
                "--max-concurrent-requests", str(self.max_concurrent_requests)]


@dataclass
class LogConfig:
    level: str = "info"  # debug, info, warning, error
    json: bool = True  # JSON lines (false: human-readable console)


@dataclass
class TelemetryConfig:
    otlp_endpoint: str = ""  # OTLP/gRPC collector (host:port) for traces; empty: no export (no tracing cost)


@dataclass
class SecurityConfig:
    # Shared secret that internal services (scheduler, workers) require in call metadata; empty: not checked.
    # `llmserve run` generates one per start when this is empty; set it (from a secret) when processes start apart.
    mesh_token: str = ""
    # TLS on every gRPC listener and every mesh client. "off": plaintext (the zero-config default, for loopback);
    # "on": the files tls_cert, tls_key and tls_ca; "auto": the files `llmserve certs` writes in tls_dir, one
    # certificate per service (`llmserve run` writes them on its first start). Files are read when a process starts.
    tls: str = "off"
    tls_cert: str = ""  # tls: on: this process's certificate (PEM, chain allowed)
    tls_key: str = ""  # tls: on: its private key (PEM)
    tls_ca: str = ""  # tls: on: the CA certificates that peers' certificates must chain to (PEM)
    tls_dir: str = ".llmserve/tls"  # tls: auto: ca.pem, <service>.pem and <service>-key.pem
    # Whether the public gateway requires client certificates. Off: public clients authenticate with API keys.
    # The internal servers (scheduler, workers, registry) always require a certificate from the CA (mTLS).
    gateway_client_auth: bool = False
    # Internal servers also check the caller's role, the common name of its certificate: the scheduler serves
    # only "gateway", workers only "scheduler" (PERMISSION_DENIED otherwise). Turn it off when certificates come
    # from a PKI that names them otherwise; a certificate of the CA is then enough.
    tls_check_roles: bool = True
    # The name the scheduler checks in workers' certificates. Workers are dialled at the address they register
    # (in Kubernetes a pod IP that no certificate names); empty: the host of that address.
    tls_worker_server_name: str = ""
    # The same for schedulers that gateways find in etcd (scheduler replicas register their pod IPs too); the
    # addresses in gateway.scheduler_address(es) are checked against their own host.
    tls_scheduler_server_name: str = ""

    def validate(self) -> None:
        # YAML 1.1 reads a bare `tls: on` / `tls: off` as a boolean, which arrives here as "True" / "False".
        self.tls = {"true": "on", "false": "off"}.get(self.tls.lower(), self.tls.lower())
        if self.tls not in ("off", "on", "auto"):
            raise ValueError(f"security.tls={self.tls!r} must be off, on or auto")
        if self.tls == "on":
            missing = [name for name in ("tls_cert", "tls_key", "tls_ca") if not getattr(self, name)]
            if missing:
                raise ValueError(f"security.tls=on needs {', '.join('security.' + m for m in missing)} (PEM files; "
                                 "`llmserve certs` makes a CA and certificates), or use security.tls=auto")
        if self.tls == "auto" and not self.tls_dir:
            raise ValueError("security.tls=auto needs security.tls_dir (where `llmserve certs` wrote the files)")


@dataclass
class MeshConfig:
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    rest: RestConfig = field(default_factory=RestConfig)
    log: LogConfig = field(default_factory=LogConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> MeshConfig:
        for section in ("gateway", "scheduler", "worker", "registry"):
            cfg = getattr(self, section)
            if not 0 <= cfg.port <= 65535:
                raise ValueError(f"{section}.port={cfg.port} must be in [0, 65535]")
        if self.worker.max_num_seqs < 1:
            raise ValueError(f"worker.max_num_seqs={self.worker.max_num_seqs} must be >= 1")
        if self.worker.max_num_batched_tokens < self.worker.max_num_seqs:
            raise ValueError(f"worker.max_num_batched_tokens={self.worker.max_num_batched_tokens} must be >= "
                             f"worker.max_num_seqs={self.worker.max_num_seqs} (every running sequence needs a token)")
        if not 0 < self.worker.kv_cache_fraction < 1:
            raise ValueError(f"worker.kv_cache_fraction={self.worker.kv_cache_fraction} must be in (0, 1)")
        if self.worker.lease_ttl_s < 2:
            raise ValueError(f"worker.lease_ttl_s={self.worker.lease_ttl_s} must be >= 2")
        self.gateway.validate()
        self.scheduler.validate()
        self.etcd.validate()
        self.security.validate()
        self.launch.validate(self.worker.port)
        if self.gateway.response_cache_ttl_s < 0:
            raise ValueError(f"gateway.response_cache_ttl_s={self.gateway.response_cache_ttl_s} must be >= 0")
        return self


def _coerce(value: typing.Any, annotation: str, where: str) -> typing.Any:
    try:
        if annotation == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation == "int":
            return int(value)
        if annotation == "float":
            return float(value)
        if annotation == "list[int]":
            return [int(v) for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
        if annotation.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: cannot read {value!r} as {annotation}") from None


def _apply(section: typing.Any, values: dict[str, typing.Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}.{key}: unknown setting; known: {', '.join(sorted(fields))}")
        setattr(section, key, _coerce(value, str(fields[key].type), f"{where}.{key}"))


def load_config(path: str | os.PathLike | None = None, env: typing.Mapping[str, str] | None = None) -> MeshConfig:
    """Defaults, then the YAML file (if any), then LLMSERVE_<SECTION>__<FIELD> variables."""
    env = os.environ if env is None else env
    config = MeshConfig()
    path = path or env.get(ENV_PREFIX + "CONFIG")
    if path:
        data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections")
        for name, values in data.items():
            if not hasattr(config, name) or not dataclasses.is_dataclass(getattr(config, name)):
                raise ValueError(f"{path}: unknown section {name!r}")
            _apply(getattr(config, name), values or {}, f"{path}:{name}")
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section_name, _, field_name = key[len(ENV_PREFIX):].lower().partition("__")
        section = getattr(config, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ValueError(f"{key}: unknown section {section_name!r}")
        _apply(section, {field_name: value}, key)
    return config.validate()
