"""Request validation at the gateway's edge, without a mesh: every rule of gateway/requests.py answers with the
right status and a message that names the field; and the records become scheduler tasks (to_pb) as specified."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.common.config import GatewayConfig
from llmserve.common.errors import ServiceError
from llmserve.gateway.requests import chat_from_pb, completion_from_pb, embeddings_from_pb
from llmserve.gateway.tokens import TokenCount
from llmserve.inference.v1 import inference_pb2 as pb

CFG = GatewayConfig()
USER = pb.ChatMessage(role="user", content="Hi")


def completion(**kw) -> pb.CreateCompletionRequest:
    return pb.CreateCompletionRequest(**{"model": "m", "prompt": "Hello", **kw})


def chat(**kw) -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(**{"model": "m", "messages": [USER], **kw})


def embeddings(**kw) -> pb.CreateEmbeddingsRequest:
    return pb.CreateEmbeddingsRequest(**{"model": "m", "input": "a cat", **kw})


def refused(parse, request, cfg: GatewayConfig = CFG) -> str:
    """The INVALID_ARGUMENT message that parsing `request` raises."""
    with pytest.raises(ServiceError) as err:
        parse(request, cfg)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value.message
    return err.value.message


# Rules every generation request shares (sampling, n, priority), for completions and chat alike.
SAMPLING_RULES = [
    (dict(model=""), "model is required"),
    (dict(max_tokens=w.Int32Value(value=0)), "max_tokens=0"),
    (dict(max_tokens=w.Int32Value(value=-3)), ">= 1"),
    (dict(max_completion_tokens=w.Int32Value(value=0)), "max_completion_tokens=0"),
    (dict(max_tokens=w.Int32Value(value=5), max_completion_tokens=w.Int32Value(value=6)),
     "max_tokens=5 and max_completion_tokens=6 differ"),
    (dict(temperature=w.FloatValue(value=2.5)), "temperature=2.5"),
    (dict(temperature=w.FloatValue(value=-0.1)), "temperature=-0.1"),
    (dict(top_p=w.FloatValue(value=0.0)), "top_p=0"),
    (dict(top_p=w.FloatValue(value=1.5)), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop has 5 strings; at most 4"),
    (dict(stop=["a", ""]), "stop strings must not be empty"),
    (dict(n=w.Int32Value(value=0)), "n=0"),
    (dict(n=w.Int32Value(value=CFG.max_n + 1)), f"n={CFG.max_n + 1}"),
    (dict(priority=9), "priority=9"),
]


@pytest.mark.parametrize("fields, needle", SAMPLING_RULES)
@pytest.mark.parametrize("make, parse", [(completion, completion_from_pb), (chat, chat_from_pb)])
def test_generation_rules_name_the_field(make, parse, fields, needle):
    assert needle in refused(parse, make(**fields))


@pytest.mark.parametrize("fields, needle", [
    (dict(prompt=""), "prompt is required"),
    (dict(prompts=["x"]), "set either prompt or prompts"),
    (dict(prompt="", prompts=["x", ""]), "prompts[1] must not be empty"),
    (dict(prompt="", prompts=["x"] * (CFG.max_prompts + 1)), f"prompts has {CFG.max_prompts + 1} entries"),
    (dict(prompt="", prompts=["x"] * 20, n=w.Int32Value(value=16)), "n=16 make 320 sequences"),
])
def test_completion_rules_name_the_field(fields, needle):
    assert needle in refused(completion_from_pb, completion(**fields))


@pytest.mark.parametrize("messages, needle", [
    ([], "messages is required"),
    ([pb.ChatMessage(role="robot", content="x")], "messages[0].role='robot'"),
    ([pb.ChatMessage(role="user", content="")], "messages must not all be empty"),
])
def test_chat_rules_name_the_field(messages, needle):
    assert needle in refused(chat_from_pb, pb.CreateChatCompletionRequest(model="m", messages=messages))


@pytest.mark.parametrize("fields, needle", [
    (dict(model=""), "model is required"),
    (dict(input=""), "input is required"),
    (dict(inputs=["x"]), "set either input or inputs"),
    (dict(input="", inputs=["x", ""]), "inputs[1] must not be empty"),
    (dict(encoding_format="int8"), "encoding_format='int8'"),  # float and base64 only
    (dict(input_token_ids=[pb.PromptTokenIds(token_ids=[1])]), "set one of input, inputs and input_token_ids"),
    (dict(input="", input_token_ids=[pb.PromptTokenIds(token_ids=[1, -2])]),
     "input_token_ids[0][1]=-2 is not a token id"),
    (dict(input="x", dimensions=w.Int32Value(value=0)), "dimensions=0 is out of range"),
    (dict(priority=7), "priority=7"),
])
def test_embeddings_rules_name_the_field(fields, needle):
    assert needle in refused(embeddings_from_pb, embeddings(**fields))


def test_embeddings_batch_limit_comes_from_the_config():
    message = refused(embeddings_from_pb, embeddings(input="", inputs=["x"] * 3), GatewayConfig(max_embedding_inputs=2))
    assert "inputs has 3 entries; at most 2" in message


def test_defaults_and_priority_normalised_once():
    call = completion_from_pb(completion(), CFG)
    assert call.priority == pb.PRIORITY_STANDARD  # unset is standard: every task carries 1..3
    assert call.sampling.max_tokens == CFG.default_completion_max_tokens and call.sampling.max_tokens_is_default
    assert call.sampling.temperature == 1.0 and call.sampling.top_p == 1.0 and call.sampling.seed is None
    assert chat_from_pb(chat(), CFG).sampling.max_tokens == CFG.default_chat_max_tokens
    assert embeddings_from_pb(embeddings(priority=pb.PRIORITY_BATCH), CFG).priority == pb.PRIORITY_BATCH
    given = completion_from_pb(completion(max_completion_tokens=w.Int32Value(value=7)), CFG).sampling
    assert given.max_tokens == 7 and not given.max_tokens_is_default


def test_a_task_per_prompt_carries_its_n_choices():
    call = completion_from_pb(completion(prompt="", prompts=["a", "b"], n=w.Int32Value(value=2),
                                         seed=w.Int64Value(value=-1), stop=["."], top_k=5,
                                         priority=pb.PRIORITY_INTERACTIVE), CFG)
    tasks = call.to_tasks("req", "m-v1")
    assert [t.request_id for t in tasks] == ["req-0", "req-1"]
    assert [t.generate.prompt for t in tasks] == ["a", "b"] and all(t.generate.n == 2 for t in tasks)
    assert all(t.model_version == "m-v1" and t.priority == pb.PRIORITY_INTERACTIVE for t in tasks)
    assert [t.generate.sampling.seed for t in tasks] == [(1 << 63) - 1] * 2  # masked to int64; the worker adds j
    assert not tasks[0].generate.prompt_token_ids  # not counted: the worker tokenizes
    s = tasks[0].generate.sampling
    assert s.has_seed and s.top_k == 5 and list(s.stop) == ["."] and s.max_tokens_is_default
    (chat_task,) = chat_from_pb(chat(), CFG).to_tasks("r", "m-v1")
    assert [(m.role, m.content) for m in chat_task.generate.messages] == [("user", "Hi")]
    assert not chat_task.generate.sampling.has_seed
    (embed_task,) = embeddings_from_pb(embeddings(input="", inputs=["x", "y"]), CFG).to_tasks("e", "m-v1")
    assert embed_task.request_id == "e-0" and list(embed_task.embed.texts) == ["x", "y"]


VERSION = rpb.ModelVersion(version="m-v1", context_length=100)


def exact(*counts) -> TokenCount:
    return TokenCount(counts, is_exact=True)


def test_context_length_is_checked_at_the_edge():
    call = completion_from_pb(completion(max_tokens=w.Int32Value(value=20)), CFG)
    call.check_context_length(VERSION, exact(80))
    with pytest.raises(ServiceError) as err:
        call.check_context_length(VERSION, exact(100))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt is 100 tokens" in err.value.message and "context length of 100" in err.value.message
    with pytest.raises(ServiceError) as err:
        call.check_context_length(VERSION, exact(81))
    assert "max_tokens (20)" in err.value.message and "at most 19" in err.value.message
    # A default max_tokens is lowered by the worker to fit; only the prompt itself must fit.
    completion_from_pb(completion(), CFG).check_context_length(VERSION, exact(99))
    batch = completion_from_pb(completion(prompt="", prompts=["a", "b"]), CFG)
    with pytest.raises(ServiceError) as err:
        batch.check_context_length(VERSION, exact(3, 120))
    assert "prompts[1] is 120 tokens" in err.value.message
    with pytest.raises(ServiceError) as err:
        chat_from_pb(chat(), CFG).check_context_length(VERSION, exact(150))
    assert "messages is 150 tokens" in err.value.message


def test_without_an_exact_count_only_max_tokens_is_checked():
    big = completion_from_pb(completion(max_tokens=w.Int32Value(value=100)), CFG)
    for counted in (None, TokenCount((10,), is_exact=False)):
        with pytest.raises(ServiceError) as err:
            big.check_context_length(VERSION, counted)
        assert "max_tokens (100)" in err.value.message and "context length of 100" in err.value.message
        completion_from_pb(completion(max_tokens=w.Int32Value(value=99)), CFG).check_context_length(VERSION, counted)
    completion_from_pb(completion(), CFG).check_context_length(VERSION, TokenCount((500,), is_exact=False))
    big.check_context_length(rpb.ModelVersion(version="m-v1"), exact(10_000))  # no context length: no check


def test_embedding_inputs_must_fit_the_context():
    call = embeddings_from_pb(embeddings(input="", inputs=["a", "b"]), CFG)
    call.check_context_length(VERSION, exact(100, 3))
    with pytest.raises(ServiceError) as err:
        call.check_context_length(VERSION, exact(3, 101))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "input[1] is 101 tokens" in err.value.message
    call.check_context_length(VERSION, None)


# Every size a caller controls is bounded, each refusal names the field and the limit.
@pytest.mark.parametrize("make, parse", [(completion, completion_from_pb), (chat, chat_from_pb)])
@pytest.mark.parametrize("fields, needle", [
    (dict(stop=["x" * (CFG.max_stop_length + 1)]), f"stop[0] is {CFG.max_stop_length + 1} characters; at most "
                                                   f"{CFG.max_stop_length}"),
    (dict(model="m" * (CFG.max_model_length + 1)), f"model is {CFG.max_model_length + 1} characters; model names "
                                                    f"are at most {CFG.max_model_length}"),
    (dict(user="u" * (CFG.max_user_length + 1)), f"user is {CFG.max_user_length + 1} characters; at most "
                                                  f"{CFG.max_user_length}"),
])
def test_caller_sizes_are_bounded(make, parse, fields, needle):
    assert needle in refused(parse, make(**fields))


def test_message_count_is_bounded_before_any_message_is_read():
    # An invalid role past the limit is not reached: the count is checked first.
    messages = [USER] * CFG.max_messages + [pb.ChatMessage(role="robot")]
    message = refused(chat_from_pb, pb.CreateChatCompletionRequest(model="m", messages=messages))
    assert message.startswith(f"messages has {CFG.max_messages + 1} entries; at most {CFG.max_messages}")
    assert chat_from_pb(pb.CreateChatCompletionRequest(model="m", messages=[USER] * CFG.max_messages), CFG)
    few = GatewayConfig(max_messages=2)
    assert "messages has 3 entries; at most 2" in refused(chat_from_pb, chat(messages=[USER] * 3), few)


def test_refusals_do_not_echo_huge_values():
    role = "r" * 100_000
    message = refused(chat_from_pb, chat(messages=[pb.ChatMessage(role=role, content="x")]))
    assert "messages[0].role='rrrr" in message and "(100000 characters)" in message and len(message) < 200
    message = refused(embeddings_from_pb, embeddings(encoding_format="b" * 100_000))
    assert "encoding_format=" in message and len(message) < 200


def test_prompt_bytes_are_checked_against_the_context_before_tokenizing():
    cfg = GatewayConfig(max_prompt_bytes_per_token=4)
    version = rpb.ModelVersion(version="m-v1", context_length=10)  # at most 40 bytes of text
    completion_from_pb(completion(prompt="x" * 40), cfg).check_prompt_bytes(version, cfg)
    for call, field in [(completion_from_pb(completion(prompt="é" * 21), cfg), "prompt"),  # 42 bytes, 21 chars
                        (completion_from_pb(completion(prompt="", prompts=["a", "x" * 41]), cfg), "prompts[1]"),
                        (chat_from_pb(chat(messages=[USER, pb.ChatMessage(role="user", content="x" * 39)]), cfg),
                         "messages"),
                        (embeddings_from_pb(embeddings(input="", inputs=["a", "x" * 41]), cfg), "input[1]")]:
        with pytest.raises(ServiceError) as err:
            call.check_prompt_bytes(version, cfg)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message.startswith(f"{field} is ") and "holds at most 40 bytes" in err.value.message
        assert f"shorten the {field}" in err.value.message
    # No context length known: nothing to check against.
    completion_from_pb(completion(prompt="x" * 1000), cfg).check_prompt_bytes(rpb.ModelVersion(version="v"), cfg)


def test_the_prompt_travels_once_as_the_gateway_counted_it():
    messages = [pb.ChatMessage(role="user", content=f"m{i}") for i in range(3)]
    call = chat_from_pb(chat(messages=messages, n=w.Int32Value(value=3), seed=w.Int64Value(value=5)), CFG)
    counted = TokenCount((4,), is_exact=True, ids=([1, 2, 3, 4],))
    (task,) = call.to_tasks("r", "m-v1", counted=counted)
    assert task.request_id == "r-0" and task.generate.n == 3 and task.generate.sampling.seed == 5
    assert list(task.generate.messages) == messages and list(task.generate.prompt_token_ids) == [1, 2, 3, 4]
    estimate = TokenCount((40,), is_exact=False)  # bytes, not tokens: never sent as ids
    assert not call.to_tasks("r", "m-v1", counted=estimate)[0].generate.prompt_token_ids


def _nan_schema():
    from google.protobuf import struct_pb2
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"x": {"type": "number", "maximum": float("nan")}}})
    return schema


@pytest.mark.parametrize("make, parse", [(completion, completion_from_pb), (chat, chat_from_pb)])
@pytest.mark.parametrize("fields, needle", [
    (lambda: dict(response_format=pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchemaFormat(
        name="n", schema=_nan_schema()))), "response_format.json_schema.schema has a number that is not finite"),
    (lambda: dict(structured_outputs=pb.StructuredOutputs(json=_nan_schema())),
     "structured_outputs.json has a number that is not finite"),
])
def test_a_schema_with_nan_is_invalid_argument_not_internal(make, parse, fields, needle):
    # json_format cannot write NaN or Infinity as JSON: this was INTERNAL before.
    assert needle in refused(parse, make(**fields()))
