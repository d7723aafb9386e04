"""LoRA adapters as registry versions through the whole mesh: registered while the mesh runs, hot-loaded by the
worker serving their base (no restart), routed by name, equal to Hugging Face + PEFT, and dropped again when the
registry disables them, while the base model's traffic runs on without a failure."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import generate_version, start_mesh
from tests.worker.engine.paged.test_lora import build_adapter, hf_peft_greedy

BASE = "tiny-llama-v1"
PROMPT = "The quick brown fox jumps over the lazy dog and then"


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    mesh = await start_mesh(make_config(), versions=[generate_version(BASE, f"file:{tiny_llama_dir}",
                                                                      context_length=512)],
                            aliases={"tiny": [(BASE, 1)]}, worker_models=[[BASE]])
    yield mesh
    await mesh.stop()


def adapter_version(name: str, path) -> rpb.ModelVersion:
    return rpb.ModelVersion(version=name, family="tiny", kind=rpb.MODEL_KIND_GENERATE, weights_source=f"file:{path}",
                            context_length=512, base_version=BASE, price_per_1k_prompt_tokens=0.1,
                            price_per_1k_completion_tokens=0.2)


def completion(model: str, max_tokens: int = 10) -> pb.CreateCompletionRequest:
    return pb.CreateCompletionRequest(model=model, prompt=PROMPT, max_tokens=w.Int32Value(value=max_tokens),
                                      temperature=w.FloatValue(value=0.0), ignore_eos=True, skip_cache=True)


async def wait_routable(mesh, name: str, present: bool = True) -> None:
    def check(workers) -> bool:
        served = {m.model_version for info in workers.values() for m in info.models}
        return (name in served) == present
    assert await mesh.scheduler.view.workers.wait_for(check, 20), f"{name} {'not ' if present else ''}routable"


async def test_an_adapter_registered_at_run_time_is_served_on_its_base(mesh, tiny_llama_dir, tmp_path):
    path = build_adapter(tiny_llama_dir, tmp_path / "acme-support", seed=5)
    await mesh.admin.CreateModelVersion(rpb.CreateModelVersionRequest(
        model_version=adapter_version("tiny-acme-support", path)))
    await wait_routable(mesh, "tiny-acme-support")
    response = await mesh.stub.CreateCompletion(completion("tiny-acme-support"), metadata=mesh.auth)
    base = await mesh.stub.CreateCompletion(completion("tiny"), metadata=mesh.auth)
    served = mesh.workers[0].models[BASE].engine
    prompt_ids = served.encode(PROMPT)
    assert response.model == "tiny-acme-support"
    assert response.choices[0].text == served.tokenizer.decode(hf_peft_greedy(tiny_llama_dir, path, prompt_ids, 10))
    assert response.choices[0].text != base.choices[0].text
    assert mesh.workers[0].models["tiny-acme-support"].engine is served  # one engine, one copy of the weights


async def test_adapters_come_and_go_while_base_traffic_runs_without_a_failure(mesh, tiny_llama_dir, tmp_path):
    failures, done = [], 0
    stop = asyncio.Event()

    async def base_traffic() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                await mesh.stub.CreateCompletion(completion("tiny", 4), metadata=mesh.auth)
                done += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code())

    traffic = [asyncio.create_task(base_traffic()) for _ in range(2)]
    path = build_adapter(tiny_llama_dir, tmp_path / "beta", seed=6, r=2, modules=["q_proj", "o_proj"])
    await mesh.admin.CreateModelVersion(rpb.CreateModelVersionRequest(model_version=adapter_version("tiny-b", path)))
    await wait_routable(mesh, "tiny-b")
    adapted = await mesh.stub.CreateCompletion(completion("tiny-b"), metadata=mesh.auth)
    assert adapted.model == "tiny-b" and adapted.usage.completion_tokens == 10
    await mesh.admin.UpdateModelVersionState(rpb.UpdateModelVersionStateRequest(
        version="tiny-b", state=rpb.MODEL_STATE_DISABLED))
    await wait_routable(mesh, "tiny-b", present=False)
    engine = mesh.workers[0].models[BASE].engine
    assert "tiny-b" not in engine.resident_adapters  # its weights are freed
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion("tiny-b"), metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stop.set()
    await asyncio.gather(*traffic)
    assert failures == [] and done > 0


async def test_an_adapter_needs_a_registered_base_that_can_carry_it(mesh, tmp_path):
    for base, needle in (("nope-v1", "is not registered"), ("tiny-acme-support", "cannot carry adapters")):
        v = adapter_version("bad-adapter", tmp_path)
        v.base_version = base
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admin.CreateModelVersion(rpb.CreateModelVersionRequest(model_version=v))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


async def test_an_adapter_that_cannot_apply_is_never_routed_to(mesh, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_dora": true}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    await mesh.admin.CreateModelVersion(rpb.CreateModelVersionRequest(
        model_version=adapter_version("tiny-broken", tmp_path)))
    await asyncio.sleep(1.5)
    assert "tiny-broken" not in mesh.workers[0].models
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion("tiny-broken"), metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no worker serves" in err.value.details()
