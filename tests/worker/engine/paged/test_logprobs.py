"""Logprobs of generated and prompt tokens from the PagedEngine, against Hugging Face's log-softmax on the real
SmolLM2 (float32, pinned by conftest): chunked prefill, prefix-cache hits and scoring only (max_tokens 0)."""

from __future__ import annotations

import pytest
import torch

from llmserve.worker.engine.contract import GenerationRequest, SamplingParams
from llmserve.worker.engine.logprobs import TokenBytes
from llmserve.worker.engine.paged.engine import PagedEngine
from llmserve.worker.models import load_generation_model
from tests.helpers.tiny_models import SMOLLM2_SOURCE, model_cache_dir

PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def smollm2():
    return load_generation_model(SMOLLM2_SOURCE, model_cache_dir())


async def run(engine: PagedEngine, request: GenerationRequest):
    return [output async for output in engine.generate(request)]


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is log P(. | ids[:i + 1])."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture
async def engine(smollm2):
    # Chunks of 8 tokens: the prompt is prefilled over several steps; blocks of 4 make the prefix cache bite.
    engine = PagedEngine(*smollm2, num_kv_blocks=128, block_size=4, max_num_batched_tokens=8)
    engine.start()
    yield engine
    await engine.stop()


async def test_generated_and_prompt_logprobs_equal_hf_log_softmax(engine, smollm2):
    model, tokenizer = smollm2
    ids = engine.encode(PROMPT)
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=5, logprobs=True, top_logprobs=5,
                            prompt_logprobs=True, ignore_eos=True)
    outputs = await run(engine, GenerationRequest("lp", ids, params))
    prompt = outputs[0].prompt_logprobs
    generated = [e for o in outputs for e in o.logprobs]
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    assert [e.token_id for e in prompt] == ids and prompt[0].logprob is None and not prompt[0].top
    assert len(generated) == outputs[-1].completion_tokens == 5
    full = ids + [e.token_id for e in generated]
    truth = hf_logprobs(model, full)
    for position, entry in enumerate(prompt[1:] + generated, start=1):
        row = truth[position - 1]
        assert abs(entry.logprob - row[entry.token_id].item()) < TOLERANCE, position
        expected = row.topk(5)
        assert [t.token_id for t in entry.top] == expected.indices.tolist(), position
        assert max(abs(t.logprob - v) for t, v in zip(entry.top, expected.values.tolist())) < TOLERANCE
    # Logprobs are the model's own, before temperature: sampling at 0.7 does not change them.
    text = "".join(o.text_delta for o in outputs)
    special = set(tokenizer.all_special_ids)
    assert b"".join(e.token for e in generated if e.token_id not in special).decode() == text
    assert b"".join(e.token for e in prompt).decode() == PROMPT


async def test_scoring_only_with_max_tokens_0_through_a_cached_prefix(engine, smollm2):
    model, _ = smollm2
    ids = engine.encode(PROMPT)
    warm = await run(engine, GenerationRequest("warm", ids, SamplingParams(temperature=0, max_tokens=1)))
    assert warm[-1].finished
    params = SamplingParams(temperature=0, max_tokens=0, logprobs=True, top_logprobs=1, prompt_logprobs=True)
    outputs = await run(engine, GenerationRequest("score", ids, params))
    assert len(outputs) == 1 and outputs[0].finish_reason == "length"
    assert outputs[0].completion_tokens == 0 and outputs[0].text_delta == "" and not outputs[0].logprobs
    assert outputs[0].cached_tokens == 0  # the prefix cache is not used: every prompt row is computed
    prompt = outputs[0].prompt_logprobs
    truth = hf_logprobs(model, ids)
    assert len(prompt) == len(ids)
    assert max(abs(e.logprob - truth[i, e.token_id].item()) for i, e in enumerate(prompt[1:])) < TOLERANCE
    # The request after it, without prompt logprobs, still takes its hits.
    again = await run(engine, GenerationRequest("again", ids, SamplingParams(temperature=0, max_tokens=1)))
    assert again[-1].cached_tokens > 0


async def test_requests_without_logprobs_carry_none(engine):
    outputs = await run(engine, GenerationRequest("plain", engine.encode(PROMPT),
                                                  SamplingParams(temperature=0, max_tokens=3)))
    assert all(not o.logprobs and o.prompt_logprobs is None for o in outputs)


def test_token_bytes_rebuild_text_with_partial_characters(smollm2):
    _, tokenizer = smollm2
    text = "Café ☕ naïve — 東京"
    ids = tokenizer.encode(text, add_special_tokens=False)
    token_bytes = TokenBytes(tokenizer)
    pieces = [token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(_not_utf8(p) for p in pieces)  # some token holds part of a character


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False
