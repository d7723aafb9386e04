"""The engine contract, checked the same way against every implementation: the PyTorch paged engine (tiny Llama),
the TensorRT-LLM backend (on its TEST DOUBLE of the LLM API, tests/worker/engine/tensorrt_llm_double.py) and the
embedding engine. The worker service relies on exactly these behaviours and nothing else."""

from __future__ import annotations

import asyncio
import types

import pytest

from llmserve.worker.engine import trtllm
from llmserve.worker.engine.contract import (
    EmbeddingEngine,
    EngineLoad,
    EngineStats,
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
)
from llmserve.worker.engine.embedding import TorchEmbeddingEngine
from llmserve.worker.engine.paged.engine import PagedEngine
from llmserve.worker.models import load_embedding_model
from tests.helpers.tiny_models import MINILM_SOURCE
from tests.worker.engine import tensorrt_llm_double as double

SCRIPT = "Paris is the capital and largest city of France, on the Seine."


def _paged(tiny_llama, tokenizer):
    return PagedEngine(*tiny_llama, max_num_seqs=4, num_kv_blocks=64, block_size=4)


def _tensorrt_llm(tiny_llama, tokenizer):
    module = types.SimpleNamespace(LLM=double.LLM, SamplingParams=double.SamplingParams)
    llm = double.LLM(tokenizer=tokenizer, script=SCRIPT)
    return trtllm.TensorRTLLMEngine(llm, tokenizer, max_num_seqs=4, context_length=512, trtllm=module)


@pytest.fixture(params=[_paged, _tensorrt_llm], ids=["paged", "tensorrt_llm(double)"])
async def engine(request, tiny_llama):
    engine = request.param(tiny_llama, tiny_llama[1])
    engine.start()
    yield engine
    await engine.stop()


def make_request(engine, request_id: str = "r", **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("ignore_eos", True)
    return GenerationRequest(request_id, engine.encode("The capital of France is"), SamplingParams(**params))


async def test_is_a_generation_engine_with_typed_records(engine):
    assert isinstance(engine, GenerationEngine) and not isinstance(engine, EmbeddingEngine)
    assert engine.context_length > 0 and engine.max_num_seqs == 4
    ids = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids and all(isinstance(i, int) for i in ids) and engine.encode("Hi") == engine.encode("Hi")
    assert isinstance(engine.load(), EngineLoad) and isinstance(engine.stats(), EngineStats)


async def test_streams_deltas_and_ends_with_one_final_output(engine):
    req = make_request(engine, max_tokens=6)
    outputs = [o async for o in engine.generate(req)]
    assert all(isinstance(o, GenerationOutput) and o.request_id == "r" for o in outputs)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    final = outputs[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 6 and final.error is None
    assert final.prompt_tokens == len(req.prompt_token_ids) and final.cached_tokens >= 0
    assert "".join(o.text_delta for o in outputs)  # text came out


async def test_stop_string_ends_with_stop_and_is_not_emitted(engine):
    full = "".join([o.text_delta async for o in engine.generate(make_request(engine, "a", max_tokens=12))])
    stop = full.strip()[2:6]
    outputs = [o async for o in engine.generate(make_request(engine, "b", max_tokens=12, stop=[stop]))]
    text = "".join(o.text_delta for o in outputs)
    assert outputs[-1].finish_reason == "stop" and stop not in text and full.startswith(text)


async def test_abort_and_leaving_early_free_the_request(engine):
    stream = engine.generate(make_request(engine, "gone", max_tokens=400))
    await anext(stream)
    assert engine.load().num_running == 1
    await stream.aclose()  # the consumer left: the engine must not keep computing for it
    for _ in range(100):
        if engine.load().num_running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.load().num_running == 0
    stream = engine.generate(make_request(engine, "x", max_tokens=400))
    await anext(stream)
    engine.abort("x")
    rest = await asyncio.wait_for(_drain(stream), 10)
    assert rest[-1].finished and rest[-1].finish_reason == "abort" and rest[-1].completion_tokens < 400
    assert engine.load().num_running == 0


async def _drain(stream) -> list[GenerationOutput]:
    return [o async for o in stream]


@pytest.fixture(scope="module")
async def embedder():
    engine = TorchEmbeddingEngine(*load_embedding_model(MINILM_SOURCE), max_num_seqs=8, max_wait_ms=5)
    engine.start()
    yield engine
    await engine.stop()


async def test_embedding_engine_contract(embedder):
    assert isinstance(embedder, EmbeddingEngine) and not isinstance(embedder, GenerationEngine)
    assert embedder.context_length == 512 and embedder.max_num_seqs == 8  # MiniLM: 512 positions
    long_text = "word " * 600
    assert embedder.count_tokens(["a cat", long_text])[1] > embedder.context_length  # counts are not truncated
    vectors, num_tokens = await embedder.embed(["a cat", "a kitten"])
    assert len(vectors) == 2 and len(vectors[0]) == 384 and num_tokens == sum(embedder.count_tokens(["a cat",
                                                                                                     "a kitten"]))
    assert embedder.load() == EngineLoad(0, 0, 8) and embedder.stats().num_steps >= 1
