"""The fuzz mesh (tiny Llama + MiniLM, real etcd and Redis), one per package: the gRPC fuzzer (test_grpc.py) and the
REST fuzzer (test_rest.py, through the sidecar binary) share it."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from llmserve.admin.v1 import tenants_pb2 as tpb
from llmserve.common.state import keys
from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import Mesh, embed_version, generate_version, start_mesh
from tests.helpers.tiny_models import MINILM_SOURCE

TINY, EMBED = "tiny-llama-v1", "minilm-v1"
# Names the mesh needs intact to serve the final normal requests: admin fuzzing may read them, not change them.
PROTECTED = {"tiny", TINY, "embed", EMBED, "test-tenant", "fuzz-limited"}
# Names admin fuzzing may change: they exist, so Update/Delete/Revoke/Rotate reach their success paths.
FUZZ_VERSIONS = ["fuzz-v1", "fuzz-v2.embed"]
FUZZ_ALIASES = ["fuzz-alias"]
FUZZ_TENANTS = ["fuzz-victim", "fuzz_other"]


@dataclasses.dataclass
class Fuzzed:
    mesh: Mesh
    admin_channel: grpc.aio.Channel
    limited_key: str
    victim_key_ids: list[str]
    admin_key_id: str
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="package")
async def fz(make_config, tiny_llama_dir):
    config = make_config()
    # A short context, short default completions and small batches bound the work of any accepted request, so
    # that each example costs milliseconds whatever the fuzzer sends (at most 16 sequences of < 64 tokens, 64
    # embedding inputs); the bounds are checked the same way at any size.
    config.gateway.default_chat_max_tokens = config.gateway.default_completion_max_tokens = 8
    config.gateway.max_sequences_per_request = config.gateway.max_prompts = 16
    config.gateway.max_embedding_inputs = 64
    # The fuzzers share the process (and the GIL) with the whole mesh: a 2 s worker lease (the tests' default) can
    # lapse while hypothesis builds a megabyte example on a loaded machine, failing requests in flight with 503s
    # that say nothing about input handling. Losing a worker is what the chaos tests are for.
    config.worker.lease_ttl_s = 10
    mesh = await start_mesh(
        config,
        versions=[generate_version(TINY, f"file:{tiny_llama_dir}", context_length=64),
                  embed_version(EMBED, MINILM_SOURCE),
                  generate_version(FUZZ_VERSIONS[0], "file:/nonexistent", context_length=64),
                  embed_version(FUZZ_VERSIONS[1], "file:/nonexistent")],
        aliases={"tiny": [(TINY, 1)], "embed": [(EMBED, 1)], FUZZ_ALIASES[0]: [(FUZZ_VERSIONS[0], 1)]},
        worker_models=[[TINY, EMBED]])
    # A tenant with every limit and a budget, so that its requests are token-counted, admitted and settled.
    await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(
        name="fuzz-limited", allowed_models=["tiny*", "embed", "minilm-*"], max_priority=pb.PRIORITY_BATCH,
        requests_per_minute=1_000_000, tokens_per_minute=2_000_000_000, budget_usd=1e6)))
    limited_key = (await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant="fuzz-limited",
                                                                           tokens_per_minute=1_000_000_000))).key
    victim_ids = []
    for name in FUZZ_TENANTS:
        await mesh.tenants.CreateTenant(tpb.CreateTenantRequest(tenant=tpb.Tenant(name=name)))
        for _ in range(2):
            victim_ids.append((await mesh.tenants.CreateApiKey(tpb.CreateApiKeyRequest(tenant=name))).api_key.key_id)
    await mesh.gateway.view.tenants.wait_for(lambda s: "fuzz-limited" in s, 5)
    await mesh.gateway.view.keys.wait_for(lambda s: len(s) >= 2 + len(victim_ids), 5)
    admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.registry.service.port}")
    admin_key_id = "adm_" + keys.hash_key(mesh.admin_key)[:12]
    yield Fuzzed(mesh, admin_channel, limited_key, victim_ids, admin_key_id, asyncio.get_running_loop())
    await admin_channel.close()
    await mesh.stop()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)
