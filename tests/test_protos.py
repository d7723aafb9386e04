"""The contracts: generated code is fresh, buf lint passes, and the package layout cannot collide."""

from __future__ import annotations

import filecmp
import importlib
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path):
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    committed = REPO / "clients" / "pb"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    have = sorted(p.relative_to(committed) for p in committed.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == have, "generated files differ from clients/pb: run `make protos` and commit"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `make protos` and commit"


def test_buf_lint_passes():
    buf = shutil.which("buf") or REPO / ".llmserve" / "tools" / "node_modules" / ".bin" / "buf"
    if not pathlib.Path(buf).exists():
        pytest.skip("buf is not installed (make test installs it and runs `buf lint` itself)")
    result = subprocess.run([str(buf), "lint", "protos"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_packages_and_service_packages_are_disjoint():
    generated = {p.name for p in (REPO / "clients" / "pb" / "llmserve").iterdir() if p.is_dir()}
    services = {"gateway", "scheduler", "worker", "registry", "clients", "common"}
    assert generated == {"inference", "dispatch", "admin"} and not generated & services
    for name in [*generated, *services]:
        importlib.import_module(f"llmserve.{name}")


def test_every_rpc_of_the_public_api_has_an_http_rule():
    from google.api import annotations_pb2

    from llmserve.inference.v1 import inference_pb2
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    routes = {}
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        routes[method.name] = rule.post or rule.get
    assert routes == {
        "CreateCompletion": "/v1/completions", "StreamCompletion": "/v1/completions:stream",
        "CreateChatCompletion": "/v1/chat/completions", "StreamChatCompletion": "/v1/chat/completions:stream",
        "CreateEmbeddings": "/v1/embeddings", "ListModels": "/v1/models",
    }
