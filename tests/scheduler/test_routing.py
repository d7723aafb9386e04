"""Routing (KV-aware, least loaded, round-robin), migration of streams whose worker is lost, and silent workers,
on the real Dispatcher with the test double of the workers' network side (tests/scheduler/test_dispatcher.py)."""

from __future__ import annotations

import time

import grpc
import pytest

from llmserve.common import kvhash
from llmserve.common.errors import ServiceError
from llmserve.dispatch.v1 import scheduler_pb2, task_pb2, worker_pb2
from llmserve.scheduler.kvindex import KvIndex
from llmserve.scheduler.queue import Entry
from tests.scheduler.test_dispatcher import MODEL, Harness, _token, next_item, settle

PROMPT = list(range(100, 164))  # 64 tokens: 3 full blocks of 16 can hit (the last token is always computed)
SALT = "tenant-a"


def submit(h: Harness, request_id: str, tokens=PROMPT, salt=SALT, n: int = 1) -> Entry:
    task = task_pb2.Task(request_id=request_id, model_version=MODEL, cache_salt=salt,
                         generate=task_pb2.GenerateInput(prompt_token_ids=tokens, n=n))
    entry = Entry(task, priority=2)
    h.dispatcher.submit(entry)
    return entry


def hold(conn, tokens=PROMPT, salt=SALT, reset=True) -> None:
    """The worker's engine reports these blocks cached (as its KV events would)."""
    keys = kvhash.prompt_block_keys(tokens, kvhash.engine_salt(salt), 16)
    conn.responses.put_nowait(worker_pb2.ServeResponse(kv_events=worker_pb2.KvEvents(
        model_version=MODEL, reset=reset, stored=keys, block_size=16)))


def report(conn, running: int, capacity: int = 4, free_kv: int = 100, kv: int = 100) -> None:
    conn.responses.put_nowait(worker_pb2.ServeResponse(load=task_pb2.LoadReport(
        worker_id=conn.worker_id, models=[task_pb2.ModelLoad(model_version=MODEL, num_running=running,
                                                             max_num_seqs=capacity, num_kv_blocks=kv,
                                                             num_free_kv_blocks=free_kv)])))


async def test_kv_routing_sends_a_prompt_to_the_worker_holding_its_prefix(make):
    h = make(routing="kv")
    w = h.workers(a=4, b=4)
    hold(w["b"])
    await settle()
    for i in range(3):  # b holds the prefix; load 1/4 and 2/4 do not outweigh a full hit
        submit(h, f"t{i}")
        await settle()
    assert w["b"].task_ids == ["t0", "t1", "t2"] and not w["a"].task_ids
    # Another tenant's equal prompt shares nothing: its salt differs, so it scores on load alone (a is idle).
    submit(h, "other", salt="tenant-b")
    await settle()
    assert w["a"].task_ids == ["other"]


async def test_an_overloaded_holder_loses_to_an_idle_worker(make):
    h = make(routing="kv")  # defaults: hit 1.0, load 1.5, pressure 0.5
    w = h.workers(a=4, b=4)
    hold(w["b"])
    report(w["b"], running=3)  # load 3/4: 1.0 - 1.5 * 0.75 < 0
    await settle()
    submit(h, "t")
    await settle()
    assert w["a"].task_ids == ["t"]
    d = h.dispatcher
    assert d.score(w["b"], MODEL, 1.0) == pytest.approx(1.0 - 1.5 * 0.75)
    # KV pressure counts too: a holder with most of its blocks in use, and some load, loses to an idle worker.
    h2 = make(routing="kv", kv_pressure_weight=2.0)
    w2 = h2.workers(a=4, b=4)
    hold(w2["b"])
    report(w2["b"], running=1, free_kv=5)
    await settle()
    submit(h2, "u")
    await settle()
    assert w2["a"].task_ids == ["u"]


async def test_round_robin_and_least_loaded_stay_selectable(make):
    h = make(routing="round_robin")
    w = h.workers(a=8, b=8, c=8)
    hold(w["a"])
    await settle()
    for i in range(6):
        submit(h, f"t{i}")
        await settle()
    assert [len(w[n].task_ids) for n in "abc"] == [2, 2, 2]  # the prefix holder gets no preference
    h = make(routing="least_loaded")
    w = h.workers(a=4, b=4)
    hold(w["a"])
    report(w["a"], running=1)
    await settle()
    submit(h, "x")
    await settle()
    assert w["b"].task_ids == ["x"]
    with pytest.raises(ValueError, match="not one of kv, least_loaded, round_robin"):
        make(routing="random")


def test_the_index_follows_snapshots_stores_evictions_and_departures():
    index = KvIndex()
    keys = kvhash.prompt_block_keys(PROMPT, SALT, 16)
    index.apply("a", worker_pb2.KvEvents(model_version=MODEL, reset=True, stored=keys, block_size=16))
    index.apply("b", worker_pb2.KvEvents(model_version=MODEL, reset=True, stored=keys[:1], block_size=16))
    assert index.cached_prefix_blocks(MODEL, keys, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 0}
    assert index.cached_prefix_blocks("other-version", keys, ["a"]) == {"a": 0}  # keys are per engine
    index.apply("a", worker_pb2.KvEvents(model_version=MODEL, removed=keys[1:2]))
    assert index.cached_prefix_blocks(MODEL, keys, ["a"]) == {"a": 1}  # the chain breaks at the evicted block
    index.apply("a", worker_pb2.KvEvents(model_version=MODEL, reset=True, stored=keys[2:], block_size=16))
    assert index.cached_prefix_blocks(MODEL, keys, ["a"]) == {"a": 0}  # a snapshot replaces what was known
    index.drop_worker("b")
    index.drop_worker("a")
    assert len(index) == 0


def output(request_id: str, text: str, token_ids: list[int], completion: int, finished=False, index: int = 0,
           finish_reason: str = ""):
    return worker_pb2.ServeResponse(output=task_pb2.TaskOutput(
        request_id=request_id, text_delta=text, token_ids=token_ids, completion_tokens=completion, index=index,
        finished=finished, finish_reason=finish_reason or ("length" if finished else "")))


async def outputs_until_dispatched(entry: Entry, timeout_s: float = 2.0) -> list:
    items = []
    while True:
        item = await next_any(entry, timeout_s)
        items.append(item)
        if isinstance(item, (scheduler_pb2.TaskDispatched, ServiceError)):
            return items


async def next_any(entry: Entry, timeout_s: float = 2.0):
    import asyncio
    return await asyncio.wait_for(entry.outbox.get(), timeout_s)


async def test_a_stream_whose_worker_is_lost_resumes_on_another_with_the_tokens_sent(make):
    h = make(routing="least_loaded", max_migrations=1)
    w = h.workers(a=4)
    entry = submit(h, "s")
    await settle()
    assert (await next_any(entry)).worker_id == "a"
    w["a"].responses.put_nowait(output("s", "Hello", [10, 11], 2))
    w["a"].responses.put_nowait(output("s", " wor", [12], 3))
    await settle()
    b = h.workers(a=4, b=4)["b"]
    w["a"].break_stream()  # SIGKILL: the stream breaks
    items = await outputs_until_dispatched(entry)
    assert [i.text_delta for i in items[:-1]] == ["Hello", " wor"] and items[-1].worker_id == "b"
    resumed = [r.task for r in b.sent if r.WhichOneof("kind") == "task"][0]
    assert list(resumed.generate.resume.token_ids) == [10, 11, 12] and resumed.generate.resume.text_length == 9
    assert list(resumed.generate.prompt_token_ids) == PROMPT  # the prompt travels as it was
    b.responses.put_nowait(output("s", "ld", [13], 4, finished=True))
    assert (await next_any(entry)).text_delta == "ld"
    # The limit: a second loss fails the request, saying why (a third worker is still there).
    h = make(max_migrations=1)
    h.workers(a=4, b=4, c=4)
    entry2 = submit(h, "s2")
    await settle()
    conn = h.dispatcher.workers[(await next_any(entry2)).worker_id]
    conn.responses.put_nowait(output("s2", "x", [1], 1))
    await settle()
    conn.break_stream()
    items = await outputs_until_dispatched(entry2)
    conn = h.dispatcher.workers[items[-1].worker_id]
    conn.break_stream()
    error = await next_item(entry2)
    assert isinstance(error, ServiceError) and error.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot be migrated: it was moved 1 time(s) already (scheduler.max_migrations=1)" in error.message


async def test_an_n_choice_stream_resumes_each_choice_and_does_not_rerun_a_finished_one(make):
    h = make(max_migrations=2)
    h.workers(a=4, b=4)
    entry = submit(h, "n", n=3)
    await settle()
    conn = h.dispatcher.workers[(await next_any(entry)).worker_id]
    for out in (output("n", "ab", [1, 2], 2), output("n", "c", [3], 1, index=1),
                output("n", "d", [4], 1, index=2, finish_reason="stop")):
        conn.responses.put_nowait(out)
    await settle()
    conn.break_stream()
    items = await outputs_until_dispatched(entry)
    assert [i.text_delta for i in items[:-1]] == ["ab", "c", "d"]
    other = h.dispatcher.workers[items[-1].worker_id]
    assert other is not conn
    resumed = [r.task for r in other.sent if r.WhichOneof("kind") == "task"][0]
    states = [(list(r.token_ids), r.text_length, r.finished) for r in resumed.generate.resume_choices]
    assert states == [([1, 2], 2, False), ([3], 1, False), ([4], 1, True)]
    assert not resumed.generate.resume.token_ids  # n > 1: per choice only


async def test_a_silent_worker_leaves_routing_and_rejoins_when_it_speaks(make):
    h = make(worker_silence_s=0.3)
    w = h.workers(a=4, b=4)
    await settle()
    w["a"].last_heard = time.monotonic() - 1  # a hung worker: its load reports stopped
    w["b"].last_heard = time.monotonic() + 60
    for i in range(3):
        submit(h, f"t{i}")
    await settle()
    assert not w["a"].task_ids and len(w["b"].task_ids) == 3
    report(w["a"], running=0)  # it is back
    await settle()
    submit(h, "t3")
    await settle()
    assert w["a"].task_ids == ["t3"]


async def test_requests_sharing_a_new_prefix_follow_the_first_before_its_blocks_are_reported(make):
    h = make(routing="kv")
    w = h.workers(a=4, b=4)
    for conn in w.values():  # the workers' engines: 16-token blocks, nothing cached yet
        conn.responses.put_nowait(worker_pb2.ServeResponse(kv_events=worker_pb2.KvEvents(
            model_version=MODEL, reset=True, block_size=16)))
    await settle()
    submit(h, "first")
    await settle()
    holder = "a" if w["a"].task_ids else "b"
    submit(h, "second")  # no KV event yet: the dispatch of "first" predicts its blocks
    submit(h, "other", tokens=list(range(500, 564)))
    await settle()
    assert w[holder].task_ids == ["first", "second"]
    assert w["b" if holder == "a" else "a"].task_ids == ["other"]


async def test_a_holder_with_cold_prefills_queued_loses_to_an_idle_worker_until_they_answer(make):
    long_prompt = list(range(5000, 6024))  # 1,024 tokens: 63 full blocks can hit
    h = make(routing="kv")
    w = h.workers(b=8)
    hold(w["b"], tokens=long_prompt)
    await settle()
    for i in range(2):  # two cold 1,000-token prompts of another tenant: 2,000 tokens to compute on b
        submit(h, f"cold{i}", tokens=list(range(10_000 * (i + 1), 10_000 * (i + 1) + 1000)), salt="tenant-b")
    await settle()
    assert w["b"].task_ids == ["cold0", "cold1"] and w["b"].prefill_backlog() == 2000
    w = h.workers(b=8, a=8)
    await settle()
    d = h.dispatcher  # b holds the prefix, but 2,000 tokens wait there; a would compute 1,024
    assert d.score(w["b"], MODEL, 1.0, 16) < d.score(w["a"], MODEL, 0.0, 1024)
    submit(h, "hit", tokens=long_prompt)
    await settle()
    assert w["a"].task_ids == ["hit"]
    for i in range(2):  # b answered both (their prefills are done): its backlog is gone, the prefix wins again
        w["b"].responses.put_nowait(_token(f"cold{i}"))
    await settle()
    assert w["b"].prefill_backlog() == 0
    submit(h, "hit2", tokens=long_prompt)
    await settle()
    assert w["b"].task_ids[-1] == "hit2"
