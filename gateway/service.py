"""InferenceService: the public API. Each RPC is the shared pipeline (gateway/pipeline.py) between its from_pb and
its response: unary RPCs build one response from the Result, streaming ones turn outputs into chunks as they come.

A request becomes one scheduler task per prompt (carrying its n choices) or one task per embeddings call; the
tasks run concurrently over Submit streams and their outputs are merged back into OpenAI-shaped responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
import typing

from llmserve.admin.v1 import registry_pb2
from llmserve.common.state.views import RegistryView
from llmserve.dispatch.v1 import task_pb2
from llmserve.gateway.context import observe
from llmserve.gateway.edge import Edge
from llmserve.gateway.pipeline import KIND_NAMES, Pipeline
from llmserve.gateway.requests import EmbeddingCall, chat_from_pb, completion_from_pb, embeddings_from_pb
from llmserve.gateway.result import Delta, logprobs_pb
from llmserve.gateway.tokenizing import Tokenizing
from llmserve.gateway.tools import StreamTools, answer_message
from llmserve.inference.v1 import inference_pb2 as pb
from llmserve.inference.v1 import inference_pb2_grpc


def system_fingerprint(version: registry_pb2.ModelVersion) -> str:
    """OpenAI's system_fingerprint: changes when what serves a model name changes (the concrete version, its weights,
    quantization or engine, or a re-registration of the same name)."""
    identity = "\0".join((version.version, version.weights_source, version.quantization, version.engine,
                          str(version.created)))
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:12]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, pipeline: Pipeline, view: RegistryView, edge: Edge):
        self.pipeline, self.view, self.edge = pipeline, view, edge
        self.tokenizing = Tokenizing(pipeline.cfg, view, edge, pipeline.tokens)

    async def Tokenize(self, request, context):
        async with observe("Tokenize") as ctx:
            return await self.tokenizing.tokenize(ctx, request, context)

    async def Detokenize(self, request, context):
        async with observe("Detokenize") as ctx:
            return await self.tokenizing.detokenize(ctx, request, context)

    async def CreateCompletion(self, request, context):
        async with observe("CreateCompletion") as ctx:
            self.pipeline.begin(ctx, context, completion_from_pb, request)
            result = await self.pipeline.run(ctx, context)
            return pb.CreateCompletionResponse(
                id=f"cmpl-{ctx.request_id}", object="text_completion", created=int(time.time()),
                model=ctx.version.version, usage=result.usage(), system_fingerprint=system_fingerprint(ctx.version),
                choices=[pb.CompletionChoice(index=i, text=t, finish_reason=r, logprobs=result.choice_logprobs(i))
                         for i, (t, r) in enumerate(result.choices)])

    async def CreateChatCompletion(self, request, context):
        async with observe("CreateChatCompletion") as ctx:
            self.pipeline.begin(ctx, context, chat_from_pb, request)
            result = await self.pipeline.run(ctx, context)
            tool_use = getattr(ctx.call, "tool_use", None)
            answers = [answer_message(t, r, tool_use) for t, r in result.choices]
            return pb.CreateChatCompletionResponse(
                id=f"chatcmpl-{ctx.request_id}", object="chat.completion", created=int(time.time()),
                model=ctx.version.version, usage=result.usage(), system_fingerprint=system_fingerprint(ctx.version),
                choices=[pb.ChatChoice(index=i, message=message, finish_reason=reason,
                                       logprobs=result.choice_logprobs(i))
                         for i, (message, reason) in enumerate(answers)])

    async def CreateEmbeddings(self, request, context):
        async with observe("CreateEmbeddings") as ctx:
            self.pipeline.begin(ctx, context, embeddings_from_pb, request)
            result = await self.pipeline.run(ctx, context)
            tokens = result.prompt_tokens
            call = typing.cast(EmbeddingCall, ctx.call)
            data = []
            for i, vector in enumerate(result.vectors):
                if call.dimensions is not None:  # a Matryoshka model: the leading values, normalised again
                    vector = vector[:call.dimensions]
                    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
                    vector = [x / norm for x in vector]
                if call.encoding_format == "base64":  # OpenAI's base64: little-endian float32 values
                    data.append(pb.Embedding(index=i, object="embedding",
                                             embedding_bytes=struct.pack(f"<{len(vector)}f", *vector)))
                else:
                    data.append(pb.Embedding(index=i, object="embedding", embedding=vector))
            return pb.CreateEmbeddingsResponse(
                object="list", model=ctx.version.version,
                usage=pb.EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens), data=data)

    async def _stream(self, method: str, parse, chunk_choice, response_cls, object_name: str, id_prefix: str,
                      request, context, *, opens_with_role: bool):
        """A stream shaped as OpenAI's: (chat) each choice opens with a chunk whose delta is only the role, then
        text deltas, the choice's last chunk carrying its finish_reason; then the usage chunk (no choices) when
        asked. A response-cache hit replays in the pieces the answer was generated in. Every chunk has the same
        id, created and system_fingerprint. A failure after the first chunk ends the stream with its status."""
        async with observe(method) as ctx:
            self.pipeline.begin(ctx, context, parse, request)
            _, call, version = ctx.begun()
            tools = StreamTools(getattr(call, "tool_use", None), call.num_sequences)  # chat: tool-call deltas
            header = dict(id=f"{id_prefix}-{ctx.request_id}", object=object_name, created=int(time.time()),
                          model=version.version, system_fingerprint=system_fingerprint(version))
            chunks: asyncio.Queue = asyncio.Queue()
            started: set[int] = set()
            include_usage = not request.HasField("stream_options") or request.stream_options.include_usage

            def put(index: int, text: str, reason: str, logprobs) -> None:
                if index not in started:
                    started.add(index)
                    if opens_with_role:
                        chunks.put_nowait(response_cls(**header, choices=[chunk_choice(index, "", "", True, None)]))
                tool_calls: list[pb.ToolCallDelta] = []
                if tools.is_active:  # text that may open a tool call is held back until it is told apart
                    text, tool_calls, reason = tools.delta(index, text, reason)
                    if not (text or tool_calls or reason or logprobs):
                        return
                chunks.put_nowait(response_cls(**header, choices=[
                    chunk_choice(index, text, reason, False, logprobs_pb(logprobs), tool_calls)]))

            async def on_output(index: int, output: task_pb2.TaskOutput, delta: Delta) -> None:
                if delta.text or output.finish_reason or delta.logprobs:
                    put(index, delta.text, output.finish_reason, delta.logprobs)

            async def produce():
                try:
                    result = await self.pipeline.run(ctx, context, on_output)
                    if ctx.cache == "hit":  # replay the cached answer in the deltas it was generated in
                        for index, (_, reason) in enumerate(result.choices):
                            for text, logprobs, is_last in result.replay(index):
                                put(index, text, reason if is_last else "", logprobs)
                    if include_usage:
                        chunks.put_nowait(response_cls(**header, usage=result.usage()))
                finally:
                    chunks.put_nowait(None)

            producer = asyncio.create_task(produce())
            try:
                while (chunk := await chunks.get()) is not None:
                    yield chunk
                await producer  # re-raises a failure of the generation
            finally:
                producer.cancel()

    def StreamCompletion(self, request, context):
        def choice(index, text, reason, _first, logprobs, _tool_calls=()):
            return pb.CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=logprobs)
        return self._stream("StreamCompletion", completion_from_pb, choice, pb.StreamCompletionResponse,
                            "text_completion", "cmpl", request, context, opens_with_role=False)

    def StreamChatCompletion(self, request, context):
        def choice(index, text, reason, first, logprobs, tool_calls=()):
            return pb.ChatChunkChoice(index=index, finish_reason=reason, logprobs=logprobs,
                                      delta=pb.ChatDelta(role="assistant" if first else "", content=text,
                                                         tool_calls=tool_calls))
        return self._stream("StreamChatCompletion", chat_from_pb, choice, pb.StreamChatCompletionResponse,
                            "chat.completion.chunk", "chatcmpl", request, context, opens_with_role=True)

    async def ListModels(self, request, context):
        async with observe("ListModels"):
            tenant = self.edge.authenticate(context).tenant
            versions = self.view.versions.snapshot
            data = []
            for alias in sorted(self.view.aliases.snapshot.values(), key=lambda a: a.name):
                if not self.edge.may_use(tenant, alias.name):
                    continue
                first = versions.get(alias.targets[0].version) if alias.targets else None
                data.append(pb.Model(
                    id=alias.name, object="model", created=alias.updated, owned_by="llmserve",
                    kind=KIND_NAMES.get(first.kind, "") if first else "",
                    context_length=first.context_length if first else 0,
                    targets=[pb.TrafficTarget(version=t.version, weight=t.weight) for t in alias.targets]))
            for v in sorted(versions.values(), key=lambda v: v.version):
                if v.state != registry_pb2.MODEL_STATE_DISABLED and self.edge.may_use(tenant, v.version):
                    data.append(pb.Model(id=v.version, object="model", created=v.created, owned_by="llmserve",
                                         kind=KIND_NAMES.get(v.kind, ""), context_length=v.context_length))
            return pb.ListModelsResponse(object="list", data=data)


def inference_service_name() -> str:
    return pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
