"""Structured outputs and per-row logit changes in the PagedEngine's batched sampler, on the tiny random Llama (the
real SmolLM2 tokenizer, so the grammar engine sees the production vocabulary): grammars hold whatever the model
would say, unconstrained neighbours decode exactly as alone, and penalties do what OpenAI / vLLM say they do."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from llmserve.common.structured import Constraint, ConstraintError
from llmserve.worker.engine.contract import GenerationRequest, SamplingParams
from llmserve.worker.engine.paged.sampler import process_rows, row_processing
from llmserve.worker.engine.paged.sequence import Sequence
from tests.worker.engine.paged.test_engine import PROMPTS, collect, make_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture
async def engine(tiny):
    engine = make_engine(tiny, max_num_seqs=8)
    yield engine
    await engine.stop()


def req(engine, prompt: str, rid: str, constraint: Constraint | None = None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 80)
    compiled = engine.compile_constraint(constraint) if constraint is not None else None
    return GenerationRequest(rid, engine.encode(prompt), SamplingParams(structured=compiled, **params))


async def test_json_schema_output_validates_for_sampled_and_greedy_rows(engine):
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    requests = [req(engine, PROMPTS[i % len(PROMPTS)], f"s{i}", constraint, temperature=1.0, seed=i)
                for i in range(5)]
    requests.append(req(engine, PROMPTS[2], "greedy", constraint))
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    for text, outputs in results:
        assert outputs[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in results}) > 1  # sampling still samples, within the grammar


async def test_regex_and_choice_are_honoured(engine):
    pattern = r"[a-z]{3}-[0-9]{2,4}"
    choices = ["red", "green", "blue sky", 'say "hi"']
    results = await asyncio.gather(
        *(collect(engine, req(engine, PROMPTS[i], f"re{i}", Constraint("regex", pattern), temperature=1.0, seed=i))
          for i in range(4)),
        *(collect(engine, req(engine, PROMPTS[i], f"ch{i}", Constraint("choice", tuple(choices)), temperature=1.0,
                              seed=i)) for i in range(4)))
    for text, outputs in results[:4]:
        assert re.fullmatch(pattern, text), text
        assert outputs[-1].finish_reason == "stop"
    for text, _ in results[4:]:
        assert text in choices


async def test_unconstrained_rows_decode_as_without_constrained_neighbours(engine):
    alone = [(await collect(engine, req(engine, p, f"a{i}", max_tokens=24, ignore_eos=True)))[0]
             for i, p in enumerate(PROMPTS[:3])]
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    mixed = await asyncio.gather(
        *(collect(engine, req(engine, p, f"m{i}", max_tokens=24, ignore_eos=True)) for i, p in enumerate(PROMPTS[:3])),
        *(collect(engine, req(engine, p, f"c{i}", constraint, temperature=1.0, seed=7 + i))
          for i, p in enumerate(PROMPTS)))
    assert [text for text, _ in mixed[:3]] == alone
    for text, _ in mixed[3:]:
        jsonschema.validate(json.loads(text), SCHEMA)


async def test_choices_of_one_grammar_each_keep_their_own_matcher(engine):
    compiled = engine.compile_constraint(Constraint("regex", r"(ab|cd){1,6}!"))
    before = engine._grammars.num_compiled
    assert engine.compile_constraint(Constraint("regex", r"(ab|cd){1,6}!")) is compiled  # cached
    assert engine._grammars.num_compiled == before
    requests = [GenerationRequest(f"n{j}", engine.encode("Hi"),
                                  SamplingParams(temperature=1.0, seed=j, max_tokens=40, structured=compiled))
                for j in range(4)]
    texts = [text for text, _ in await asyncio.gather(*(collect(engine, r) for r in requests))]
    assert all(re.fullmatch(r"(ab|cd){1,6}!", t) for t in texts), texts


async def test_logprobs_stay_the_models_own_under_a_grammar(engine):
    free = req(engine, PROMPTS[1], "free", max_tokens=1, logprobs=True, top_logprobs=5, ignore_eos=True)
    bound = req(engine, PROMPTS[1], "bound", Constraint("choice", ("zzzz",)), max_tokens=3, logprobs=True,
                top_logprobs=5)
    (_, free_out), (text, bound_out) = await asyncio.gather(collect(engine, free), collect(engine, bound))
    assert text == "zzzz"
    first_free, first_bound = free_out[-1].logprobs[0], bound_out[0].logprobs[0]
    assert [t.token_id for t in first_bound.top] == [t.token_id for t in first_free.top]
    assert first_bound.top[0].logprob == pytest.approx(first_free.top[0].logprob, abs=1e-4)
    assert first_bound.token_id != first_free.token_id  # the grammar chose; the logprobs did not move


def test_uncompilable_constraints_name_the_part(engine):
    cases = [
        (Constraint("json_schema", '{"type": "strin"}', "response_format.json_schema.schema"), "strin"),
        (Constraint("json_schema", "{not json", "response_format.json_schema.schema"), "not valid JSON"),
        (Constraint("regex", "(ab", "structured_outputs.regex"), "unclosed group"),
        (Constraint("choice", ("a", ""), "structured_outputs.choice"), "empty string"),
        (Constraint("grammar", "start: foo", "structured_outputs.grammar"), 'unknown name: "foo"'),
    ]
    for constraint, reason in cases:
        for _ in range(2):  # the second time from the cache, with the same message
            with pytest.raises(ConstraintError) as info:
                engine.compile_constraint(constraint)
            assert str(info.value).startswith(constraint.field) and reason in str(info.value), str(info.value)


async def test_a_grammar_at_a_dead_end_finishes_that_row_only(engine):
    compiled = engine.compile_constraint(Constraint("regex", "ab"))

    class Broken:  # a real llguidance matcher put in its error state (a token the grammar refuses)
        constraint = compiled.constraint

        def matcher(self):
            m = compiled.matcher()
            assert not m.accept(engine.encode("zz")[0])
            return m

    dead = GenerationRequest("dead", engine.encode("Hi"), SamplingParams(temperature=0.0, max_tokens=5,
                                                                         structured=Broken()))
    alive = req(engine, PROMPTS[1], "alive", max_tokens=6, ignore_eos=True)
    (_, dead_out), (_, alive_out) = await asyncio.gather(collect(engine, dead), collect(engine, alive))
    assert dead_out[-1].finish_reason == "error" and "dead end" in dead_out[-1].error
    assert alive_out[-1].finish_reason == "length" and alive_out[-1].completion_tokens == 6
    assert engine.stats().num_free_kv_blocks == engine.stats().num_kv_blocks


# ---- penalties, logit_bias, min_tokens, stop_token_ids ----

async def test_logit_bias_100_forces_a_token_and_minus_100_bans_one(engine):
    token = engine.encode(" banana")[0]
    text, outputs = await collect(engine, req(engine, PROMPTS[0], "b", max_tokens=4, ignore_eos=True,
                                              logit_bias={token: 100.0}))
    assert text == " banana" * 4
    free, _ = await collect(engine, req(engine, PROMPTS[1], "f", max_tokens=8, ignore_eos=True))
    first = engine.encode(free)[0]
    banned, _ = await collect(engine, req(engine, PROMPTS[1], "x", max_tokens=8, ignore_eos=True,
                                          logit_bias={first: -100.0}))
    assert engine.encode(banned)[0] != first and first not in engine.encode(banned)


async def test_min_tokens_holds_back_eos(engine):
    eos = engine.tokenizer.eos_token_id
    _, soon = await collect(engine, req(engine, PROMPTS[0], "e", max_tokens=20, logit_bias={eos: 100.0}))
    assert (soon[-1].finish_reason, soon[-1].completion_tokens) == ("stop", 1)
    _, later = await collect(engine, req(engine, PROMPTS[0], "m", max_tokens=20, logit_bias={eos: 100.0},
                                         min_tokens=6))
    assert (later[-1].finish_reason, later[-1].completion_tokens) == ("stop", 7)


async def test_stop_token_ids_finish_when_sampled(engine):
    prompt = engine.encode(PROMPTS[1])
    outputs = [o async for o in engine.generate(GenerationRequest(
        "ids", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=True)))]
    ids = [e.token_id for o in outputs for e in o.logprobs]
    k = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    text, stopped = await collect(engine, req(engine, PROMPTS[1], "st", max_tokens=12, ignore_eos=True,
                                              stop_token_ids=[ids[k]]))
    assert (stopped[-1].finish_reason, stopped[-1].completion_tokens) == ("stop", k + 1)
    assert text == engine.tokenizer.decode(ids[:k])
    # min_tokens masks a stop token too: the sequence runs past position k
    _, held = await collect(engine, req(engine, PROMPTS[1], "mt", max_tokens=12, ignore_eos=True,
                                        stop_token_ids=[ids[k]], min_tokens=k + 2))
    assert held[-1].completion_tokens > k + 1


def _seq(prompt: list[int], generated: list[int], **params) -> Sequence:
    seq = Sequence(prompt, SamplingParams(**params))
    for t in generated:
        seq.append_token(t)
    seq.processing = row_processing(seq.params, {0})
    return seq


def test_penalties_follow_openai_and_hf_formulas():
    vocab = 12
    logits = torch.linspace(-3, 3, vocab).repeat(3, 1)
    plain = Sequence([1], SamplingParams())
    openai = _seq([1, 2], [5, 5, 7], presence_penalty=0.5, frequency_penalty=0.25)
    hf = _seq([1, 2], [5, 9], repetition_penalty=1.5)
    out, dead = process_rows([plain, openai, hf], logits)
    assert dead == [False] * 3
    assert torch.equal(out[0], logits[0]) and plain.processing is None
    expected = logits[1].clone()
    expected[5] -= 2 * 0.25 + 0.5
    expected[7] -= 1 * 0.25 + 0.5  # the prompt's tokens (1, 2) are not penalized by OpenAI's penalties
    assert torch.allclose(out[1], expected)
    expected = logits[2].clone()
    for t in (1, 2, 5, 9):  # prompt and generated, once each
        expected[t] = expected[t] / 1.5 if expected[t] > 0 else expected[t] * 1.5
    assert torch.allclose(out[2], expected)
    assert torch.equal(logits, torch.linspace(-3, 3, vocab).repeat(3, 1))  # the model's own logits are untouched


# ---- the worker's own refusals (what reaches it without the gateway's checks) ----

async def test_the_worker_refuses_what_cannot_compile_and_engines_that_cannot_constrain(engine):
    import grpc

    from llmserve.admin.v1 import registry_pb2
    from llmserve.worker.engine.trtllm import TensorRTLLMEngine
    from llmserve.worker.service import ServedModel, WorkerServicer
    from tests.worker.engine import tensorrt_llm_double as double
    from tests.worker.test_service import VERSION, run, servicer, task

    bad = task("bad", 5)
    bad.generate.sampling.structured.regex = "(ab"
    penalty = task("pen", 5)
    penalty.generate.sampling.presence_penalty = 9.0
    outside = task("out", 5)
    outside.generate.sampling.logit_bias[10**6] = 1.0
    outputs = {o.request_id: o for o in await run(servicer(engine), bad, penalty, outside)}
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert outputs["bad"].error.code == invalid and "structured.regex" in outputs["bad"].error.message
    assert outputs["pen"].error.code == invalid and "presence_penalty" in outputs["pen"].error.message
    assert outputs["out"].error.code == invalid and "outside the vocabulary" in outputs["out"].error.message

    tokenizer = engine.tokenizer
    module = type("M", (), {"LLM": double.LLM, "SamplingParams": double.SamplingParams})
    trt = TensorRTLLMEngine(double.LLM(tokenizer=tokenizer, script="hi"), tokenizer, max_num_seqs=4,
                            context_length=512, trtllm=module)
    version = registry_pb2.ModelVersion(version=VERSION, kind=registry_pb2.MODEL_KIND_GENERATE, context_length=512,
                                        engine="tensorrt-llm")
    svc = WorkerServicer("w", {VERSION: ServedModel(version, trt)}, 60.0)
    constrained, biased = task("c", 5), task("b", 5)
    constrained.generate.sampling.structured.json_object = True
    biased.generate.sampling.min_tokens = 2
    outputs = {o.request_id: o for o in await run(svc, constrained, biased)}
    assert outputs["c"].error.code == invalid and "does not constrain decoding" in outputs["c"].error.message
    assert outputs["b"].error.code == invalid and "min_tokens" in outputs["b"].error.message
    # and the engine itself, if anything calls it directly
    direct = [o async for o in trt.generate(GenerationRequest("d", [1, 2], SamplingParams(logit_bias={1: 2.0})))]
    assert direct[-1].finish_reason == "error" and "logit_bias" in direct[-1].error
