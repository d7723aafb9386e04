"""A small typed Python client over the generated stubs.

    from llmserve.clients.client import Client
    with Client("127.0.0.1:50051", api_key=open(".llmserve/dev-api-key").read().strip()) as llm:
        answer = llm.chat("smollm2", [("user", "What is the capital of France?")], temperature=0)
        print(answer.choices[0].message.content)
"""

from __future__ import annotations

import typing

import grpc
from google.protobuf import wrappers_pb2

from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc

Messages = typing.Sequence[tuple[str, str] | pb.ChatMessage]
PRIORITIES = {"interactive": pb.PRIORITY_INTERACTIVE, "standard": pb.PRIORITY_STANDARD, "batch": pb.PRIORITY_BATCH}


def _params(max_tokens=None, temperature=None, top_p=None, top_k=0, seed=None, stop=(), n=None, user="",
            priority="standard", skip_cache=False, ignore_eos=False) -> dict:
    fields: dict = dict(top_k=top_k, stop=list(stop), user=user, priority=PRIORITIES[priority],
                        skip_cache=skip_cache, ignore_eos=ignore_eos)
    if max_tokens is not None:
        fields["max_tokens"] = wrappers_pb2.Int32Value(value=max_tokens)
    if temperature is not None:
        fields["temperature"] = wrappers_pb2.FloatValue(value=temperature)
    if top_p is not None:
        fields["top_p"] = wrappers_pb2.FloatValue(value=top_p)
    if seed is not None:
        fields["seed"] = wrappers_pb2.Int64Value(value=seed)
    if n is not None:
        fields["n"] = wrappers_pb2.Int32Value(value=n)
    return fields


def _messages(messages: Messages) -> list[pb.ChatMessage]:
    return [m if isinstance(m, pb.ChatMessage) else pb.ChatMessage(role=m[0], content=m[1]) for m in messages]


class Client:
    def __init__(self, target: str = "127.0.0.1:50051", api_key: str = "", timeout_s: float | None = 300.0,
                 credentials: grpc.ChannelCredentials | None = None):
        """credentials: TLS to a gateway that serves it, e.g. `grpc.ssl_channel_credentials(open(ca, "rb").read())`
        (None: plaintext)."""
        self.channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.timeout_s = timeout_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def complete(self, model: str, prompt: str | typing.Sequence[str], **params) -> pb.CreateCompletionResponse:
        prompts = {"prompt": prompt} if isinstance(prompt, str) else {"prompts": list(prompt)}
        return self.stub.CreateCompletion(pb.CreateCompletionRequest(model=model, **prompts, **_params(**params)),
                                          metadata=self.metadata, timeout=self.timeout_s)

    def stream_complete(self, model: str, prompt: str | typing.Sequence[str], **params
                        ) -> typing.Iterator[pb.StreamCompletionResponse]:
        prompts = {"prompt": prompt} if isinstance(prompt, str) else {"prompts": list(prompt)}
        return self.stub.StreamCompletion(pb.StreamCompletionRequest(model=model, **prompts, **_params(**params)),
                                          metadata=self.metadata, timeout=self.timeout_s)

    def chat(self, model: str, messages: Messages, **params) -> pb.CreateChatCompletionResponse:
        return self.stub.CreateChatCompletion(
            pb.CreateChatCompletionRequest(model=model, messages=_messages(messages), **_params(**params)),
            metadata=self.metadata, timeout=self.timeout_s)

    def stream_chat(self, model: str, messages: Messages, **params
                    ) -> typing.Iterator[pb.StreamChatCompletionResponse]:
        return self.stub.StreamChatCompletion(
            pb.StreamChatCompletionRequest(model=model, messages=_messages(messages), **_params(**params)),
            metadata=self.metadata, timeout=self.timeout_s)

    def embed(self, model: str, inputs: str | typing.Sequence[str], skip_cache: bool = False,
              priority: str = "standard") -> pb.CreateEmbeddingsResponse:
        texts = {"input": inputs} if isinstance(inputs, str) else {"inputs": list(inputs)}
        return self.stub.CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model=model, **texts, skip_cache=skip_cache, priority=PRIORITIES[priority]),
            metadata=self.metadata, timeout=self.timeout_s)

    def models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout_s)
