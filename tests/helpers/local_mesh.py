"""A throwaway local mesh on free ports: `llmserve run` in a subprocess with its own config and state folder.

For integration tests and benchmarks (ours and users'):
    with LocalMesh(tmp_dir) as mesh:
        client = Client(mesh.gateway, mesh.api_key)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import yaml

from llmserve.common.net import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "scheduler", "worker", "registry")


def _replica_order(name: str) -> tuple[int, str]:
    return (int(name.rpartition("-")[2]) if name.startswith("gateway-") else 1, name)


def listening_pid(port: int) -> int | None:
    """The process holding the IPv4 or IPv6 listening socket on a loopback TCP port (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


class LocalMesh:
    def __init__(self, directory: str | pathlib.Path, *, models_file: str | pathlib.Path | None = None,
                 worker: dict | None = None, gateway: dict | None = None, gateways: int = 1,
                 cache_redis: bool = False, start_timeout_s: float = 600, workers: int = 1,
                 worker_models: list[list[str]] | None = None, launch_gateways: bool = False, schedulers: int = 1):
        """gateways: gateway processes (the first on ports["gateway"], replicas on ports["gateway-2"], ...);
        cache_redis: a response-cache Redis of its own (ports["redis-cache"]), as `make run` has;
        workers: worker processes (launch.workers: ports["worker"], ports["worker-2"], ...), worker i serving
        worker_models[i] when given (launch.worker_models);
        launch_gateways: the gateways are launch.gateways behind HAProxy on ports["gateway"] (`front`), each on
        ports["gateway-1"], ports["gateway-2"], ... (`gateways`);
        schedulers: scheduler processes (launch.schedulers: ports["scheduler"], ports["scheduler-2"], ...)."""
        self.launch_gateways = launch_gateways
        self.dir = pathlib.Path(directory)
        self.state = self.dir / "state"
        replicas = [f"gateway-{i}" for i in range(1 if launch_gateways else 2, gateways + 1)]
        extra_workers = [f"worker-{i}" for i in range(2, workers + 1)]
        extra_schedulers = [f"scheduler-{i}" for i in range(2, schedulers + 1)]
        extra = [*replicas, *extra_workers, *extra_schedulers, *(["redis-cache"] if cache_redis else [])]
        self.ports = {name: free_port() for name in ("etcd", "redis", "rest", *SERVICES, *extra)}
        self.metrics_ports = {name: free_port() for name in SERVICES}
        p, m = self.ports, self.metrics_ports
        self.config_path = self.dir / "llmserve.yaml"
        redis = {"url": f"redis://127.0.0.1:{p['redis']}/0"}
        if cache_redis:
            redis["cache_url"] = f"redis://127.0.0.1:{p['redis-cache']}/0"
        self.config_path.write_text(yaml.safe_dump({
            "etcd": {"port": p["etcd"]},
            "redis": redis,
            "gateway": {"port": p["gateway"], "metrics_port": m["gateway"], "journal_dir": str(self.state / "journal"),
                        "scheduler_address": f"127.0.0.1:{p['scheduler']}",
                        "replica_ports": [] if launch_gateways else [p[name] for name in replicas],
                        **(gateway or {})},
            "scheduler": {"port": p["scheduler"], "metrics_port": m["scheduler"]},
            "worker": {"port": p["worker"], "metrics_port": m["worker"],
                       "model_cache_dir": str(REPO / ".llmserve" / "models"),
                       "models": ["smollm2-135m-instruct-v1", "all-minilm-l6-v2-v1"], **(worker or {})},
            "registry": {"port": p["registry"], "metrics_port": m["registry"]},
            "rest": {"port": p["rest"], "gateway_address": f"127.0.0.1:{p['gateway']}"},
            "launch": {
                **({"workers": workers, "worker_ports": [p["worker"], *(p[w] for w in extra_workers)],
                    "worker_models": [" ".join(models) for models in worker_models or []]} if workers > 1 else {}),
                **({"gateways": gateways, "gateway_ports": [p[name] for name in replicas]}
                   if launch_gateways else {}),
                **({"schedulers": schedulers, "scheduler_ports": [p["scheduler"], *(p[s] for s in extra_schedulers)]}
                   if schedulers > 1 else {})},
        }))
        self.models_file = pathlib.Path(models_file or REPO / "deploy" / "local" / "models.yaml")
        self.start_timeout_s = start_timeout_s
        self.output: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._ready = threading.Event()

    def start(self) -> LocalMesh:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmserve.clients.cli", "--config", str(self.config_path), "run",
             "--models", str(self.models_file), "--state-dir", str(self.state)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("llmserve run did not come up:\n" + "".join(self.output))
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if "llmserve is up" in line:
                self._ready.set()

    @property
    def api_key(self) -> str:
        return (self.state / "dev-api-key").read_text().strip()

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    @property
    def gateway(self) -> str:
        return self.address("gateway")

    @property
    def front(self) -> str:
        """The address clients use: HAProxy with launch_gateways, else the first gateway."""
        return self.address("gateway")

    @property
    def gateways(self) -> list[str]:
        """Every gateway process's address, the first one first."""
        return [self.address(name) for name in sorted(self.ports, key=_replica_order)
                if (name == "gateway" and not self.launch_gateways) or name.startswith("gateway-")]

    def pid(self, name: str) -> int | None:
        """The process listening on the port of `name` ("worker", "gateway-2", "etcd", "redis", ...), or None."""
        return listening_pid(self.ports[name])

    @property
    def rest_url(self) -> str:
        """Base URL of the OpenAI-compatible REST sidecar (for `OpenAI(base_url=...)`)."""
        return f"http://127.0.0.1:{self.ports['rest']}/v1"

    def stop(self) -> float:
        """Ctrl-C, as a user would; returns how long the shutdown took."""
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
        return time.monotonic() - started

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
