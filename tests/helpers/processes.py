"""A service of the mesh as a real child process (`python -m llmserve.<service>`), configured through a YAML file
made from a MeshConfig: for tests and benches that kill, stop or hang one (SIGKILL, SIGSTOP)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]


class ServiceProcess:
    def __init__(self, config, directory: pathlib.Path, service: str, name: str, **settings):
        """settings: the service's own section's values for this process (port, ids, models...)."""
        merged = dataclasses.asdict(config)
        merged[service].update(settings)
        path = directory / f"{service}-{name}.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in merged.items() if k in ("etcd", service, "log")}))
        self.log = open(directory / f"{service}-{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", f"llmserve.{service}", "--config", str(path)], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LLMSERVE_SECURITY__MESH_TOKEN": config.security.mesh_token})

    def stop(self, graceful: bool = False) -> None:
        """SIGKILL (after SIGCONT, for a stopped one), or with graceful SIGTERM and up to 15 s to drain."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            if graceful:
                self.proc.send_signal(signal.SIGTERM)
            else:
                self.proc.kill()
        try:
            self.proc.wait(15 if graceful else 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
