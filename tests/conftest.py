"""Session-wide real dependencies: etcd and Redis processes on free ports (each test uses its own etcd prefix)."""

from __future__ import annotations

import itertools
import os
import pathlib
import tempfile

import pytest

from llmserve.common.config import MeshConfig
from tests.helpers.servers import etcd_server, redis_server, running
from tests.helpers.tiny_models import build_tiny_llama, model_cache_dir

REPO = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def etcd():
    with running(etcd_server()) as server:
        yield server


@pytest.fixture(scope="session")
def redis_srv():
    with running(redis_server()) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    """A random 2-layer Llama with the real SmolLM2 tokenizer, saved once per test run."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir, tmp_path_factory):
    """(model, tokenizer) of the tiny Llama, loaded once per test run (engines only read the weights)."""
    from llmserve.worker.models import load_generation_model

    return load_generation_model(str(tiny_llama_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def make_config(etcd, redis_srv):
    """make_config() -> a fresh MeshConfig for the real test servers (see _config)."""
    return lambda: _config(etcd, redis_srv)


@pytest.fixture
def mesh_config(make_config) -> MeshConfig:
    return make_config()


def _config(etcd, redis_srv) -> MeshConfig:
    """A config pointing at the real test servers, a fresh etcd prefix, every service on port 0."""
    config = MeshConfig()
    config.etcd.port = etcd.port
    config.etcd.prefix = f"/test{next(_prefixes)}"
    config.redis.url = f"redis://127.0.0.1:{redis_srv.port}/0"
    config.gateway.journal_dir = tempfile.mkdtemp(prefix="llmserve-journal-")
    for section in (config.gateway, config.scheduler, config.worker, config.registry):
        section.port = 0
        section.metrics_port = 0
    config.worker.model_cache_dir = str(model_cache_dir())
    config.worker.lease_ttl_s = 2
    # A lost worker or an unreachable scheduler fails requests at once (test_chaos tests the waits).
    config.scheduler.worker_wait_s = 0
    config.gateway.scheduler_wait_s = 0
    config.worker.dtype = "float32"  # the same numbers on every machine ("auto" picks by CPU)
    return config

