"""A pool of real worker processes behind the in-process scheduler and gateway: a worker SIGKILLed in the middle of
a stream costs no text (the scheduler resumes the stream on the other worker from the tokens already sent), and a
hung worker (SIGSTOP) leaves routing after scheduler.worker_silence_s and rejoins when it returns (tiny model)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from llmserve.clients.client import _params
from llmserve.common.net import free_port
from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import generate_version, start_mesh
from tests.helpers.processes import ServiceProcess

TINY = "tiny-llama-v1"
PROMPT = "Once upon a time, in a land far away, there lived"
MAX_TOKENS = 400


class WorkerProcess(ServiceProcess):
    def __init__(self, config, directory, name: str):
        self.port = free_port()
        self.worker_id = f"pool-{name}"
        super().__init__(config, directory, "worker", name, port=self.port, metrics_port=0, worker_id=self.worker_id,
                         models=[TINY])


@pytest.fixture
async def pool(make_config, tiny_llama_dir, tmp_path):
    config = make_config()
    config.security.mesh_token = "pool-test-token"
    config.worker.lease_ttl_s = 10  # a SIGSTOPped worker keeps its registration: only its silence counts
    config.worker.load_report_interval_s = 0.5
    config.scheduler.worker_silence_s = 2.0
    config.scheduler.max_migrations = 2
    mesh = await start_mesh(config, versions=[generate_version(TINY, f"file:{tiny_llama_dir}")],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[])
    workers = [WorkerProcess(config, tmp_path, name) for name in ("a", "b")]
    try:
        await mesh.scheduler.view.workers.wait_for(
            lambda s: all(w.worker_id in s for w in workers), 120)
        dispatcher = mesh.scheduler.dispatcher
        deadline = time.monotonic() + 60
        while not all(dispatcher.workers.get(w.worker_id) and dispatcher.workers[w.worker_id].is_ready
                      for w in workers):
            assert time.monotonic() < deadline, "workers did not answer"
            await asyncio.sleep(0.1)
        yield mesh, workers
    finally:
        for w in workers:
            w.stop()
        await mesh.stop()


async def _stream(mesh, on_chunk=None, **params) -> tuple[str, str, list[str]]:
    """(text, finish reason, the x-llmserve-worker trailer's workers) of one streamed completion."""
    call = mesh.stub.StreamCompletion(pb.StreamCompletionRequest(
        model="tiny", prompt=PROMPT, **_params(**{"max_tokens": MAX_TOKENS, "skip_cache": True, "ignore_eos": True,
                                                   **params})),
        metadata=mesh.auth, timeout=120)
    texts: dict[int, str] = {}  # per choice: with n > 1 the choices' chunks interleave in any order
    reason, chunks = "", 0
    async for chunk in call:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            reason = choice.finish_reason or reason
        chunks += 1
        if on_chunk is not None:
            on_chunk(chunks)
    trailer = dict(await call.trailing_metadata()).get("x-llmserve-worker", "")
    return " | ".join(texts[j] for j in sorted(texts)), reason, trailer.split(",") if trailer else []


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 42},
                                    {"temperature": 1.0, "seed": 42, "n": 2}], ids=["greedy", "seeded", "n=2"])
async def test_a_worker_killed_mid_stream_costs_no_text(pool, params):
    mesh, workers = pool
    expected, reason, served = await _stream(mesh, **params)
    assert reason == "length" and len(served) == 1
    by_id = {w.worker_id: w for w in workers}
    killed: list[str] = []

    def kill_after_a_few_chunks(n: int) -> None:
        if n == 5 and not killed:  # the stream is under way: SIGKILL the worker serving it
            busy = [wid for wid, conn in mesh.scheduler.dispatcher.workers.items() if conn.entries]
            killed.extend(busy)
            for wid in busy:
                by_id[wid].proc.kill()
    text, reason, served = await _stream(mesh, on_chunk=kill_after_a_few_chunks, **params)
    assert killed, "no worker was running the stream when it was to be killed"
    assert reason == "length"
    assert text == expected  # one uninterrupted stream, the text of the undisturbed run
    assert served[0] == killed[0] and len(served) == 2 and served[1] != killed[0]


async def test_a_stream_that_cannot_move_fails_unavailable_saying_why(pool):
    mesh, workers = pool
    mesh.scheduler.dispatcher.max_migrations = 0
    import grpc

    def kill_all(n: int) -> None:
        if n == 3:
            for w in workers:
                w.proc.kill()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _stream(mesh, on_chunk=kill_all, temperature=0.0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot be migrated: migration is off (scheduler.max_migrations=0)" in err.value.details()


async def test_a_hung_worker_leaves_routing_and_rejoins(pool):
    mesh, workers = pool
    dispatcher = mesh.scheduler.dispatcher
    dispatcher.routing = "round_robin"  # both workers take turns while both answer
    hung = workers[0]
    hung.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    while not dispatcher.workers[hung.worker_id].is_silent(dispatcher.worker_silence_s):
        await asyncio.sleep(0.1)
    left_after = time.monotonic() - stopped
    assert left_after < dispatcher.worker_silence_s + 1.5  # its last report came at most one interval earlier
    served = [await _stream(mesh, temperature=0.0, max_tokens=4) for _ in range(4)]
    assert {s[2][0] for s in served} == {workers[1].worker_id}  # nothing waits for the hung one
    hung.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while dispatcher.workers[hung.worker_id].is_silent(dispatcher.worker_silence_s):
        assert time.monotonic() < deadline, "the worker did not rejoin"
        await asyncio.sleep(0.1)
    served = [await _stream(mesh, temperature=0.0, max_tokens=4) for _ in range(4)]
    assert {s[2][0] for s in served} == {w.worker_id for w in workers}
