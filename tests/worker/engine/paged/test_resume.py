"""Migration and KV events at the engine: a stream resumed from the tokens a lost worker had sent continues with
exactly the text of an undisturbed run (greedy and seeded), and the prefix cache's stored/evicted keys reach
listeners with the keys a router computes (common/kvhash.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmserve.common.kvhash import engine_salt, prompt_block_keys
from llmserve.worker.engine.contract import GenerationRequest, SamplingParams
from tests.worker.engine.paged.test_engine import make_engine

PROMPT = "Once upon a time, in a land far away, there lived a king who"


@pytest.fixture
async def engine(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=4)
    yield engine
    await engine.stop()


async def _run(engine, request_id: str, params: dict, resume: list[int] | None = None, text_length: int = 0):
    req = GenerationRequest(request_id, engine.encode(PROMPT), SamplingParams(**params),
                            resume_token_ids=resume or [], resume_text_length=text_length)
    return [out async for out in engine.generate(req)]


@pytest.mark.parametrize("params", [
    {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True},
    {"temperature": 1.0, "seed": 1234, "max_tokens": 24, "ignore_eos": True},
    {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 24, "ignore_eos": True, "stop": ["zzzz"]},
], ids=["greedy", "seeded", "seeded-top-p-stop"])
async def test_a_resumed_stream_continues_with_the_undisturbed_text(engine, params):
    whole = await _run(engine, "whole", params)
    text = "".join(o.text_delta for o in whole)
    ids = [t for o in whole for t in o.token_ids]
    assert len(ids) == 24 and whole[-1].completion_tokens == 24
    for cut in (1, 5, len(whole) - 2):  # the lost worker had sent this many outputs
        sent = whole[:cut]
        sent_ids = [t for o in sent for t in o.token_ids]
        sent_text = "".join(o.text_delta for o in sent)
        rest = await _run(engine, f"resumed-{cut}", params, sent_ids, len(sent_text))
        assert sent_text + "".join(o.text_delta for o in rest) == text
        assert sent_ids + [t for o in rest for t in o.token_ids] == ids
        assert rest[-1].completion_tokens == 24 and rest[-1].prompt_tokens == whole[-1].prompt_tokens
        assert rest[-1].cached_tokens <= rest[-1].prompt_tokens


async def test_held_back_text_of_a_lost_stream_is_not_lost(engine):
    """The lost worker had sent tokens whose text it still held (a possible stop string): the resumed stream
    starts with that text."""
    params = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}
    whole = await _run(engine, "whole", params)
    text = "".join(o.text_delta for o in whole)
    ids = [t for o in whole for t in o.token_ids]
    rest = await _run(engine, "resumed", params, ids[:6], 0)  # 6 tokens sent, none of their text
    assert "".join(o.text_delta for o in rest) == text


async def test_kv_listeners_get_a_snapshot_then_each_steps_stored_and_evicted_keys(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=2, num_kv_blocks=24, block_size=4)
    events: list[tuple[bool, list[bytes], list[bytes], int]] = []
    got = threading.Event()

    def listener(reset, stored, removed, block_size):
        events.append((reset, stored, removed, block_size))
        got.set()
    try:
        unsubscribe = engine.subscribe_kv_events(listener)
        await asyncio.to_thread(got.wait, 5)
        assert events == [(True, [], [], 4)]  # the snapshot of an empty cache
        prompt = engine.encode(PROMPT)
        out = [o async for o in engine.generate(GenerationRequest("a", prompt, SamplingParams(
            temperature=0.0, max_tokens=4, ignore_eos=True), cache_salt="tenant"))]
        await asyncio.sleep(0.2)
        held: set[bytes] = set()
        for reset, stored, removed, _ in events:
            if reset:
                held = set()
            held |= set(stored)
            held -= set(removed)
        assert set(prompt_block_keys(prompt, engine_salt("tenant"), 4)) <= held
        assert out[-1].finished
        # Another long prompt on the tiny pool evicts blocks: evictions are reported.
        other = engine.encode("A completely different story about " + "dragons and castles " * 25)
        [o async for o in engine.generate(GenerationRequest("b", other, SamplingParams(
            temperature=0.0, max_tokens=4, ignore_eos=True)))]
        await asyncio.sleep(0.2)  # the last step's events follow its outputs
        assert any(removed for _, _, removed, _ in events)
        for reset, stored, removed, _ in events:
            if reset:
                held = set()
            held |= set(stored)
            held -= set(removed)
        assert held == set(engine.block_manager.hash_to_block)  # the listener's view is the engine's cache
        unsubscribe()
    finally:
        await engine.stop()
