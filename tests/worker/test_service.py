"""WorkerService's Serve stream on a real PagedEngine (tiny random Llama): tasks with n choices, prompts sent as the
gateway's token ids, and back-pressure when the scheduler stops reading."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.admin.v1 import registry_pb2
from llmserve.dispatch.v1 import task_pb2, worker_pb2
from llmserve.worker.engine.paged.engine import PagedEngine
from llmserve.worker.service import ServedModel, WorkerServicer

VERSION = "tiny-v1"


class _Context:
    """What Serve reads of grpc's ServicerContext: the peer, for its log lines."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


@pytest.fixture
async def engine(tiny_llama):
    engine = PagedEngine(*tiny_llama, max_num_seqs=8, num_kv_blocks=256, block_size=4)
    engine.start()
    yield engine
    await engine.stop()


def servicer(engine, **kwargs) -> WorkerServicer:
    version = registry_pb2.ModelVersion(version=VERSION, kind=registry_pb2.MODEL_KIND_GENERATE, context_length=512)
    return WorkerServicer("w", {VERSION: ServedModel(version, engine)}, 60.0, **kwargs)


def task(request_id: str, max_tokens: int, n: int = 1, prompt: str = "Hello there", token_ids=(),
         seed: int | None = None) -> task_pb2.Task:
    sampling = task_pb2.SamplingParams(temperature=1.0 if seed is not None else 0.0, max_tokens=max_tokens,
                                       ignore_eos=True, has_seed=seed is not None, seed=seed or 0)
    return task_pb2.Task(request_id=request_id, model_version=VERSION, generate=task_pb2.GenerateInput(
        prompt=prompt, sampling=sampling, n=n, prompt_token_ids=list(token_ids)))


async def run(svc: WorkerServicer, *tasks: task_pb2.Task) -> list[task_pb2.TaskOutput]:
    """Sends the tasks on one Serve stream and reads its outputs until every task finished."""
    requests: asyncio.Queue = asyncio.Queue()
    for t in tasks:
        requests.put_nowait(worker_pb2.ServeRequest(task=t))

    async def request_iterator():
        while True:
            yield await requests.get()

    outputs, open_tasks = [], len(tasks)
    stream = svc.Serve(request_iterator(), _Context())
    async for message in stream:
        if message.HasField("output"):
            outputs.append(message.output)
            open_tasks -= message.output.finished
            if not open_tasks:
                break
    await stream.aclose()
    return outputs


async def test_a_task_samples_its_n_choices_and_ends_once(engine):
    outputs = await run(servicer(engine), task("t", max_tokens=5, n=3, seed=42))
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished  # the task's last output
    by_choice: dict[int, list[task_pb2.TaskOutput]] = {}
    for o in outputs:
        by_choice.setdefault(o.index, []).append(o)
    assert sorted(by_choice) == [0, 1, 2]
    for choice in by_choice.values():
        ends = [o for o in choice if o.finish_reason]
        assert len(ends) == 1 and ends[0] is choice[-1] and ends[0].finish_reason == "length"
        assert ends[0].completion_tokens == 5
    texts = ["".join(o.text_delta for o in by_choice[j]) for j in range(3)]
    # Choice j draws from seed + j: the same as a task of one choice with that seed.
    solo = await run(servicer(engine), task("s", max_tokens=5, seed=43))
    assert "".join(o.text_delta for o in solo) == texts[1]
    assert len(set(texts)) > 1


def _by_choice(outputs) -> dict[int, list[task_pb2.TaskOutput]]:
    by_choice: dict[int, list[task_pb2.TaskOutput]] = {}
    for o in outputs:
        by_choice.setdefault(o.index, []).append(o)
    return by_choice


async def test_a_migrated_task_of_n_choices_resumes_each_and_skips_the_finished_one(engine):
    # The undisturbed run: 3 seeded choices of 12 tokens.
    full = _by_choice(await run(servicer(engine), task("t", max_tokens=12, n=3, seed=7)))
    texts = {j: "".join(o.text_delta for o in outs) for j, outs in full.items()}
    ids = {j: [t for o in outs for t in o.token_ids] for j, outs in full.items()}
    # The lost worker had sent choice 0's first 4 tokens, choice 1's first 7, and all of choice 2.
    cut = {0: 4, 1: 7}
    resumed = task("t2", max_tokens=12, n=3, seed=7)
    for j in range(3):
        sent = ids[j][:cut[j]] if j in cut else ids[j]
        text = engine.tokenizer.decode(sent, skip_special_tokens=True) if j in cut else texts[j]
        resumed.generate.resume_choices.append(task_pb2.ResumeState(token_ids=sent, text_length=len(text),
                                                                    finished=j not in cut))
    outputs = await run(servicer(engine), resumed)
    rest = _by_choice(outputs)
    assert sorted(rest) == [0, 1] and outputs[-1].finished  # choice 2 had finished: not run again
    for j in (0, 1):
        sent_text = engine.tokenizer.decode(ids[j][:cut[j]], skip_special_tokens=True)
        assert sent_text + "".join(o.text_delta for o in rest[j]) == texts[j]
        assert rest[j][-1].completion_tokens == 12 and rest[j][-1].finish_reason == "length"


async def test_the_gateways_token_ids_are_used_as_they_are(engine):
    ids = engine.encode("The quick brown fox jumps")
    outputs = await run(servicer(engine), task("t", max_tokens=3, prompt="ignored text", token_ids=ids))
    assert outputs[-1].prompt_tokens == len(ids)
    text = "".join(o.text_delta for o in outputs)
    reference = await run(servicer(engine), task("r", max_tokens=3, prompt="The quick brown fox jumps"))
    assert text == "".join(o.text_delta for o in reference)


async def test_n_beyond_the_engine_is_refused_with_the_limit(engine):
    (output,) = await run(servicer(engine), task("t", max_tokens=3, n=9))
    assert output.finished and output.error.code == 3  # INVALID_ARGUMENT
    assert "n=9" in output.error.message and "(8)" in output.error.message


async def test_a_stalled_scheduler_stream_cancels_the_task_and_frees_the_engine(engine):
    svc = servicer(engine, max_outbox_messages=2, stalled_stream_timeout_s=0.5)
    requests: asyncio.Queue = asyncio.Queue()
    requests.put_nowait(worker_pb2.ServeRequest(task=task("t", max_tokens=480, n=2)))

    async def request_iterator():
        while True:
            yield await requests.get()

    stream = svc.Serve(request_iterator(), _Context())
    await anext(stream)  # the stream's first load report; then the scheduler stops reading
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while engine.load().num_running < 2 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert engine.load().num_running == 2
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        if engine.load().num_running == 0 and engine.load().num_waiting == 0:
            break
    load = engine.load()
    assert (load.num_running, load.num_waiting) == (0, 0)
    assert engine.num_steps < 400  # aborted long before its 480 tokens: not generating for nobody
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    await stream.aclose()


async def test_logprobs_travel_per_choice_and_the_prompt_is_scored_once_per_choice(engine):
    t = task("t", max_tokens=3, n=2, seed=5)
    t.generate.sampling.logprobs, t.generate.sampling.top_logprobs = True, 2
    t.generate.sampling.prompt_logprobs = True
    outputs = await run(servicer(engine), t)
    for j in (0, 1):
        mine = [o for o in outputs if o.index == j]
        assert sum(len(o.logprobs) for o in mine) == 3
        assert all(len(e.top) == 2 and e.top[0].logprob >= e.top[1].logprob for o in mine for e in o.logprobs)
        prompts = [o.prompt_logprobs for o in mine if o.prompt_logprobs]
        assert len(prompts) == 1 and [e.token_id for e in prompts[0]] == engine.encode("Hello there")
        assert not prompts[0][0].top and all(e.logprob < 0 for e in prompts[0][1:])


async def test_max_tokens_0_is_scoring_only_and_refused_without_prompt_logprobs(engine):
    t = task("t", max_tokens=0)
    (refused,) = await run(servicer(engine), t)
    assert refused.error.code == 3 and "max_tokens=0" in refused.error.message
    t.generate.sampling.prompt_logprobs = True
    (scored,) = await run(servicer(engine), t)
    assert scored.finished and scored.finish_reason == "length" and scored.completion_tokens == 0
    assert len(scored.prompt_logprobs) == scored.prompt_tokens
