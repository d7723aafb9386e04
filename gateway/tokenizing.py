"""Tokenize and Detokenize (vLLM's POST /tokenize and /detokenize): a prompt or a conversation becomes the token ids
a request to the model would be charged for, with the same tokenizer, chat template and rules the pipeline counts
with (gateway/tokens.py, common/tokenizers.py), and ids become text again.

Callers are authenticated and the model authorized as for any request; nothing is generated, queued or billed, so
no limit or budget is touched. Sizes are bounded before anything is tokenized: a prompt by the model's context (in
bytes, as requests are), a conversation by max_messages, ids by the model's context length.
"""

from __future__ import annotations

import asyncio
import dataclasses

from llmserve.admin.v1 import registry_pb2
from llmserve.common.config import GatewayConfig
from llmserve.common.errors import failed_precondition, invalid_argument, not_found
from llmserve.common.state.views import RegistryView
from llmserve.common.tokenizers import prompt_ids
from llmserve.gateway.context import RequestContext
from llmserve.gateway.edge import Edge
from llmserve.gateway.requests import _check_prompt_bytes, _messages, _model
from llmserve.gateway.tokens import TokenCounter
from llmserve.gateway.tools import tool_use_from_pb
from llmserve.inference.v1 import inference_pb2 as pb

MAX_DETOKENIZE_IDS = 1 << 16  # a version without a context length still takes at most this many ids


class Tokenizing:
    def __init__(self, cfg: GatewayConfig, view: RegistryView, edge: Edge, tokens: TokenCounter):
        self.cfg, self.view, self.edge, self.tokens = cfg, view, edge, tokens

    async def _begin(self, ctx: RequestContext, context, model: str):
        """Auth, the model name, its version (authorized, enabled) and the version's tokenizer."""
        ctx.caller = self.edge.authenticate(context)
        name = _model(model, self.cfg)
        found = self.view.resolve(name, "")
        if found is None:
            raise not_found(f"model {name!r} not found; ListModels (GET /v1/models) lists the available models")
        version = found.version
        self.edge.authorize_model(ctx.caller, name, version)
        if version.state == registry_pb2.MODEL_STATE_DISABLED:
            raise failed_precondition(f"model version {version.version!r} is disabled in the registry")
        ctx.version = version
        return version

    async def _tokenizer(self, version: registry_pb2.ModelVersion):
        tokenizer = await self.tokens.tokenizer(version)
        if tokenizer is None:
            # Loading failed (it is not retried): a state of this version, not of the request or a passing fault.
            raise failed_precondition(f"model version {version.version!r} has no tokenizer the gateway can load "
                                      "(see its tokenizer_source label), so it cannot tokenize or detokenize here")
        return tokenizer

    async def tokenize(self, ctx: RequestContext, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        version = await self._begin(ctx, context, request.model)
        if request.prompt and request.messages:
            raise invalid_argument("set either prompt or messages, not both")
        is_embed = version.kind == registry_pb2.MODEL_KIND_EMBED
        if request.messages:
            if is_embed:
                raise invalid_argument(f"model {version.version!r} is an embedding model and has no chat template: "
                                       "send prompt instead of messages")
            messages, template = _messages(request, self.cfg)
            tool_use = tool_use_from_pb(request)
            if tool_use is not None:
                template = dataclasses.replace(template, tools=tool_use.shown)
            _check_prompt_bytes("messages", sum(len(c.encode()) for _, c in messages)
                                + (tool_use.num_bytes if tool_use else 0), version, self.cfg)
            tokenizer = await self._tokenizer(version)
            ids = await asyncio.to_thread(template.ids, tokenizer, messages)
        elif request.prompt:
            if request.tools or request.HasField("tool_choice"):
                raise invalid_argument("tools and tool_choice apply to messages; a prompt is tokenized as it is")
            if request.HasField("add_generation_prompt") or request.continue_final_message:
                raise invalid_argument("add_generation_prompt and continue_final_message apply to messages; a "
                                       "prompt is tokenized as it is")
            _check_prompt_bytes("prompt", len(request.prompt.encode()), version, self.cfg)
            tokenizer = await self._tokenizer(version)
            if is_embed:  # as embeddings are counted: an encoder adds its special tokens ([CLS] ... [SEP])
                ids = await asyncio.to_thread(lambda: list(tokenizer(request.prompt)["input_ids"]))
            else:
                ids = await asyncio.to_thread(prompt_ids, tokenizer, request.prompt)
        else:
            raise invalid_argument("prompt or messages is required: the text (or conversation) to tokenize")
        response = pb.TokenizeResponse(count=len(ids), max_model_len=version.context_length, tokens=ids)
        if request.return_token_strs:
            response.token_strs.extend(tokenizer.convert_ids_to_tokens(ids))
        ctx.prompt_tokens, ctx.completion_tokens = len(ids), 0
        return response

    async def detokenize(self, ctx: RequestContext, request: pb.DetokenizeRequest, context
                         ) -> pb.DetokenizeResponse:
        version = await self._begin(ctx, context, request.model)
        limit = version.context_length or MAX_DETOKENIZE_IDS
        if len(request.tokens) > limit:  # counted before anything iterates them
            raise invalid_argument(f"tokens has {len(request.tokens)} ids; at most {limit} (the context length of "
                                   f"model {version.version!r}) are allowed: split the request")
        tokenizer = await self._tokenizer(version)
        vocab = len(tokenizer)
        for i, token in enumerate(request.tokens):
            if not 0 <= token < vocab:
                raise invalid_argument(f"tokens[{i}]={token} is outside the vocabulary of model {version.version!r}: "
                                       f"token ids are 0 to {vocab - 1}")
        ids = list(request.tokens)
        text = await asyncio.to_thread(lambda: tokenizer.decode(ids, skip_special_tokens=False,
                                                                clean_up_tokenization_spaces=False))
        return pb.DetokenizeResponse(prompt=text)
