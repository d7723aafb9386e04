"""Logprobs, echo and token-id prompts over gRPC through the whole mesh (tiny random Llama with SmolLM2's tokenizer):
what lm-evaluation-harness sends to score multiple-choice answers (echo + logprobs, max_tokens 0 or 1, batched
token-id prompts), chat logprobs, streams, the response cache, and the refusals."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf import wrappers_pb2 as w

from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import generate_version, start_mesh

TINY = "tiny-llama-v1"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
async def mesh(make_config, tiny_llama_dir):
    mesh = await start_mesh(make_config(), versions=[generate_version(TINY, f"file:{tiny_llama_dir}",
                                                                      context_length=512)],
                            aliases={"tiny": [(TINY, 1)]}, worker_models=[[TINY]])
    yield mesh
    await mesh.stop()


def hf_logprobs(tiny_llama, ids: list[int]) -> torch.Tensor:
    model, _ = tiny_llama
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def completion(**kw) -> pb.CreateCompletionRequest:
    fields = dict(model="tiny", max_tokens=w.Int32Value(value=4), temperature=w.FloatValue(value=0.0),
                  ignore_eos=True)
    fields.update(kw)
    return pb.CreateCompletionRequest(**fields)


def ids_of(tiny_llama, text: str) -> list[int]:
    return tiny_llama[1].encode(text, add_special_tokens=False)


@pytest.mark.parametrize("max_tokens", [0, 1])
async def test_echo_with_logprobs_scores_token_id_prompts_as_lm_eval_does(mesh, tiny_llama, max_tokens):
    contexts = ["The capital of France is Paris", "Two plus two is four and"]
    prompts = [ids_of(tiny_llama, t) for t in contexts]
    response = await mesh.stub.CreateCompletion(completion(
        prompt_token_ids=[pb.PromptTokenIds(token_ids=p) for p in prompts], echo=True,
        logprobs=w.Int32Value(value=1), max_tokens=w.Int32Value(value=max_tokens)), metadata=mesh.auth)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.prompt_tokens == sum(map(len, prompts))
    assert response.usage.completion_tokens == 2 * max_tokens
    for choice, ids, context in zip(response.choices, prompts, contexts):
        assert choice.text.startswith(context) and choice.finish_reason == "length"
        content = choice.logprobs.content
        assert [e.token_id for e in content[:len(ids)]] == ids and len(content) == len(ids) + max_tokens
        assert not content[0].HasField("logprob") and not content[0].top_logprobs  # the first token: null
        truth = hf_logprobs(tiny_llama, [e.token_id for e in content])
        for i, entry in enumerate(content[1:], start=1):
            assert abs(entry.logprob.value - truth[i - 1, entry.token_id].item()) < TOLERANCE
            (top,) = entry.top_logprobs
            assert top.token_id == truth[i - 1].argmax().item()
        # text_offset: each token's characters in the choice's text
        assert [e.text_offset for e in content[:3]] == [0, len(content[0].token), len(content[0].token)
                                                        + len(content[1].token)]
        assert "".join(e.token for e in content) == choice.text
        if max_tokens:  # greedy: the generated token is the top alternative
            assert content[-1].token_id == content[-1].top_logprobs[0].token_id


async def test_generated_logprobs_stream_equal_unary_and_a_cache_hit(mesh):
    request = completion(prompt="Once upon a time", logprobs=w.Int32Value(value=3), max_tokens=w.Int32Value(value=6))
    unary = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    (choice,) = unary.choices
    assert len(choice.logprobs.content) == 6 and all(len(e.top_logprobs) == 3 for e in choice.logprobs.content)
    assert all(e.HasField("logprob") and e.logprob.value <= 0 for e in choice.logprobs.content)
    assert choice.logprobs.content[0].text_offset == 0 and not choice.text.startswith("Once")
    cached = await mesh.stub.CreateCompletion(request, metadata=mesh.auth)
    assert cached.choices[0].logprobs == choice.logprobs and cached.usage.prompt_tokens_details.cached_tokens
    stream_request = pb.StreamCompletionRequest()
    stream_request.ParseFromString(request.SerializeToString())
    stream_request.skip_cache = True
    entries, text = [], ""
    async for chunk in mesh.stub.StreamCompletion(stream_request, metadata=mesh.auth):
        for c in chunk.choices:
            text += c.text
            entries.extend(c.logprobs.content)
    assert text == choice.text and entries == list(choice.logprobs.content)


async def test_without_logprobs_choices_carry_none(mesh):
    response = await mesh.stub.CreateCompletion(completion(prompt="Hello", echo=True), metadata=mesh.auth)
    assert not response.choices[0].HasField("logprobs") and response.choices[0].text.startswith("Hello")


async def test_a_single_token_id_prompt_equals_its_text(mesh, tiny_llama):
    text = "The quick brown fox"
    by_ids = await mesh.stub.CreateCompletion(completion(
        prompt_token_ids=[pb.PromptTokenIds(token_ids=ids_of(tiny_llama, text))]), metadata=mesh.auth)
    by_text = await mesh.stub.CreateCompletion(completion(prompt=text), metadata=mesh.auth)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage == by_text.usage


async def test_chat_logprobs_unary_and_stream(mesh):
    request = pb.CreateChatCompletionRequest(
        model="tiny", messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=w.Int32Value(value=5),
        temperature=w.FloatValue(value=0.0), ignore_eos=True, logprobs=True, top_logprobs=2, skip_cache=True)
    response = await mesh.stub.CreateChatCompletion(request, metadata=mesh.auth)
    content = response.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.token_id == e.top_logprobs[0].token_id for e in content)  # greedy
    assert all(bytes(e.bytes) == e.token.encode() for e in content if not e.token.startswith("bytes:"))
    stream_request = pb.StreamChatCompletionRequest()
    stream_request.ParseFromString(request.SerializeToString())
    streamed = [e async for chunk in mesh.stub.StreamChatCompletion(stream_request, metadata=mesh.auth)
                for c in chunk.choices for e in c.logprobs.content]
    assert streamed == list(content)


@pytest.mark.parametrize(("fields", "message"), [
    ({"prompt": "x", "logprobs": w.Int32Value(value=21)}, "logprobs=21 is out of range"),
    ({"prompt": "x", "max_tokens": w.Int32Value(value=0)}, "0 only with echo"),
    ({"prompt": "x", "prompt_token_ids": [pb.PromptTokenIds(token_ids=[1])]}, "not several"),
    ({"prompt_token_ids": [pb.PromptTokenIds(token_ids=[1]), pb.PromptTokenIds()]}, "prompt_token_ids[1] has no"),
    ({"prompt_token_ids": [pb.PromptTokenIds(token_ids=[-4])]}, "prompt_token_ids[0][0]=-4"),
    ({"prompt_token_ids": [pb.PromptTokenIds(token_ids=[5]), pb.PromptTokenIds(token_ids=[1, 49152])]},
     "prompt_token_ids[1][1]=49152 is outside the vocabulary"),
])
async def test_bad_logprobs_and_token_ids_are_refused_naming_the_field(mesh, fields, message):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.CreateCompletion(completion(**fields), metadata=mesh.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


async def test_chat_top_logprobs_need_logprobs(mesh):
    for fields, message in [({"top_logprobs": 2}, "top_logprobs needs logprobs"),
                            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs=21 is out of range")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
                model="tiny", messages=[pb.ChatMessage(role="user", content="Hi")], **fields), metadata=mesh.auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
