"""Sampling is per sequence: hostile parameters or broken scores in one row end that row only, never the batch."""

from __future__ import annotations

import asyncio

import torch

from llmserve.worker.engine.contract import SamplingParams
from llmserve.worker.engine.paged.sampler import sample
from llmserve.worker.engine.paged.sequence import Sequence
from tests.worker.engine.paged.test_engine import collect, make_engine, request


def seq(**params) -> Sequence:
    return Sequence([1, 2, 3], SamplingParams(**params))


def test_tiny_temperatures_are_greedy_and_do_not_overflow():
    logits = torch.randn(4, 1000) * 30
    seqs = [seq(temperature=t) for t in (1e-40, 1e-30, 1e-7, 0.0)]
    assert sample(seqs, logits) == logits.argmax(-1).tolist()


def test_a_row_with_nan_scores_fails_alone():
    logits = torch.randn(3, 500)
    logits[1, 7] = float("nan")
    seqs = [seq(temperature=0.0), seq(temperature=0.8, seed=1), seq(temperature=0.8, seed=2)]
    tokens = sample(seqs, logits)
    assert tokens[1] is None
    assert tokens[0] == int(logits[0].argmax())
    assert isinstance(tokens[2], int) and 0 <= tokens[2] < 500


def test_infinite_scores_still_sample_a_valid_token():
    logits = torch.randn(2, 300)
    logits[0, 5] = float("inf")
    logits[1, :] = float("-inf")
    logits[1, 9] = 0.0
    tokens = sample([seq(temperature=1.5, seed=3), seq(temperature=2.0, seed=4)], logits)
    assert tokens == [5, 9]


def test_sampling_follows_the_distribution_and_seeds_reproduce():
    probs = torch.tensor([0.5, 0.3, 0.2] + [0.0] * 97)
    logits = probs.clamp(min=1e-30).log().repeat(4000, 1)
    seqs = [seq(temperature=1.0) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(sample(seqs, logits)), minlength=100).float() / 4000
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], probs[:3], atol=0.04)
    flat = torch.zeros(20, 100)  # uniform: every seed draws its own sequence of tokens, the same each time
    draws = [sample([seq(temperature=1.0, seed=s) for s in range(20)], flat) for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 5


def test_top_k_and_top_p_still_restrict_the_candidates():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(300, 1)
    tokens = sample([seq(temperature=1.0, top_k=2, seed=i) for i in range(300)], logits)
    assert set(tokens) <= {0, 1} and len(set(tokens)) == 2
    tokens = sample([seq(temperature=1.0, top_p=0.5, seed=i) for i in range(300)], logits)
    assert set(tokens) == {0}


async def test_an_attacker_at_temperature_1e_40_does_not_break_the_victim_in_the_same_batch(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=8)
    try:
        prompt = "The quick brown fox jumps over the lazy dog and then"
        greedy, _ = await collect(engine, request(engine, prompt, "alone", max_tokens=12, ignore_eos=True))
        victim = request(engine, prompt, "victim", temperature=0.7, seed=5, max_tokens=12, ignore_eos=True)
        attacker = request(engine, prompt, "attacker", temperature=1e-40, max_tokens=12, ignore_eos=True)
        (_, v_out), (a_text, a_out) = await asyncio.gather(collect(engine, victim), collect(engine, attacker))
        assert v_out[-1].finish_reason == "length" and v_out[-1].error is None
        assert v_out[-1].completion_tokens == 12
        # a temperature that small is greedy: the attacker gets the greedy text, not an error
        assert a_out[-1].error is None and a_text == greedy
    finally:
        await engine.stop()
