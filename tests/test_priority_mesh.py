"""Priorities through the whole mesh (gateway -> scheduler -> worker, tiny model): with every slot of the worker
held by batch streams, an interactive request is served at once, its worker preempting a batch sequence, and the
batch streams still produce exactly their undisturbed text."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.clients.client import _params
from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import generate_version, start_mesh

TINY = "tiny-llama-v1"
PROMPTS = ("Once upon a time, in a land far away, there lived", "The quick brown fox jumps over the lazy dog and")


@pytest.fixture
async def mesh(make_config, tiny_llama_dir):
    config = make_config()
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{tiny_llama_dir}")],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[])
    await mesh.add_worker([TINY], max_num_seqs=2)
    try:
        yield mesh
    finally:
        await mesh.stop()


async def _stream(mesh, prompt: str, priority: str, max_tokens: int, started: asyncio.Event | None = None) -> str:
    call = mesh.stub.StreamCompletion(pb.StreamCompletionRequest(
        model="tiny", prompt=prompt, **_params(max_tokens=max_tokens, temperature=0.0, skip_cache=True,
                                               ignore_eos=True, priority=priority)), metadata=mesh.auth, timeout=120)
    text, chunks = "", 0
    async for chunk in call:
        text += "".join(choice.text for choice in chunk.choices)
        chunks += 1
        if started is not None and chunks == 3:
            started.set()
    return text


async def test_an_interactive_request_does_not_wait_for_batch_streams_holding_every_slot(mesh):
    alone = [await _stream(mesh, p, "batch", 300) for p in PROMPTS]
    started = [asyncio.Event(), asyncio.Event()]
    batch = [asyncio.create_task(_stream(mesh, p, "batch", 300, e)) for p, e in zip(PROMPTS, started)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)  # both slots are batch's now
    worker = mesh.scheduler.dispatcher.workers[mesh.workers[0].worker_id]
    assert worker.room(TINY) == 0
    text = await _stream(mesh, "Hello there", "interactive", 8)
    assert text and not any(job.done() for job in batch)  # served while both batch streams still run
    assert await asyncio.gather(*batch) == alone  # the preempted one resumed with the same text
