"""The TensorRT-LLM adapter against a TEST DOUBLE of tensorrt_llm's LLM API (no TensorRT-LLM on these machines)."""

from __future__ import annotations

import asyncio
import types

import pytest

from llmserve.worker.engine import trtllm
from llmserve.worker.engine.contract import GenerationRequest, SamplingParams
from tests.helpers.tiny_models import smollm2_tokenizer
from tests.worker.engine import tensorrt_llm_double as double

SCRIPT = "The capital of France is Paris. It is a large city."


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def engine(tokenizer, script=SCRIPT):
    module = types.SimpleNamespace(LLM=double.LLM, SamplingParams=double.SamplingParams)
    llm = double.LLM(tokenizer=tokenizer, script=script)
    return trtllm.TensorRTLLMEngine(llm, tokenizer, max_num_seqs=8, context_length=2048, trtllm=module), llm


async def run(eng, **params) -> tuple[str, list]:
    request = GenerationRequest("r1", [1, 2, 3], SamplingParams(**params))
    outputs = [o async for o in eng.generate(request)]
    return "".join(o.text_delta for o in outputs), outputs


async def test_streams_deltas_and_maps_sampling_params(tokenizer):
    eng, llm = engine(tokenizer)
    text, outputs = await run(eng, temperature=0.0, top_k=5, seed=7, max_tokens=64, ignore_eos=True)
    assert text == SCRIPT
    assert outputs[-1].finished and outputs[-1].finish_reason == "stop"
    assert outputs[-1].prompt_tokens == 3 and outputs[-1].completion_tokens == len(tokenizer.encode(SCRIPT))
    (prompt, params), = llm.requests
    assert prompt == [1, 2, 3]
    assert (params.temperature, params.top_k, params.seed, params.max_tokens, params.ignore_eos) == (0.0, 5, 7, 64,
                                                                                                    True)


async def test_length_and_stop_strings(tokenizer):
    eng, _ = engine(tokenizer)
    text, outputs = await run(eng, max_tokens=3)
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 3
    text, outputs = await run(eng, max_tokens=64, stop=["Paris"])
    assert text == "The capital of France is " and outputs[-1].finish_reason == "stop"


async def test_abort_and_consumer_leaving_free_the_request(tokenizer):
    eng, llm = engine(tokenizer)
    request = GenerationRequest("r2", [1], SamplingParams(max_tokens=64))
    stream = eng.generate(request)
    await anext(stream)
    assert eng.load().num_running == 1
    await stream.aclose()  # the worker's task was cancelled
    assert eng.load().num_running == 0 and llm.aborted == 1 and not llm.active
    task = asyncio.create_task(run(eng, max_tokens=64))
    await asyncio.sleep(0.01)
    eng.abort("r1")
    _, outputs = await asyncio.wait_for(task, 5)
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert llm.aborted == 2 and eng.load().num_running == 0


def test_missing_package_says_how_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_trtllm(name, *args, **kwargs):
        if name == "tensorrt_llm":
            raise ImportError("No module named 'tensorrt_llm'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_trtllm)
    monkeypatch.setattr(trtllm.importlib, "import_module", lambda name: no_trtllm(name))
    with pytest.raises(RuntimeError) as err:
        trtllm.import_tensorrt_llm("big-model-v1")
    assert "pip install .[tensorrt]" in str(err.value) and "big-model-v1" in str(err.value)


def test_registry_entry_with_engine_tensorrt_llm_loads_the_adapter(monkeypatch, tiny_llama_dir):
    import sys

    from llmserve.admin.v1 import registry_pb2
    from llmserve.common.config import MeshConfig
    from llmserve.worker.app import load_model

    folder = tiny_llama_dir
    version = registry_pb2.ModelVersion(version="big-v1", family="big", kind=registry_pb2.MODEL_KIND_GENERATE,
                                        engine="tensorrt_llm", weights_source=f"file:{folder}", context_length=1024)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", double)
    served = load_model(version, MeshConfig())
    assert isinstance(served.engine, trtllm.TensorRTLLMEngine)
    assert served.engine.llm.model == str(folder) and served.context_length == 1024
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # not installed
    with pytest.raises(RuntimeError, match=r"pip install \.\[tensorrt\]"):
        load_model(version, MeshConfig())


@pytest.mark.parametrize("params", [{"logprobs": True}, {"prompt_logprobs": True, "max_tokens": 0}])
async def test_logprobs_are_refused_with_a_clear_error(tokenizer, params):
    eng, llm = engine(tokenizer)
    assert eng.supports_logprobs is False  # the worker refuses such tasks with INVALID_ARGUMENT first
    _, outputs = await run(eng, **params)
    assert outputs[-1].finish_reason == "error" and "logprobs" in outputs[-1].error
    assert not llm.requests
