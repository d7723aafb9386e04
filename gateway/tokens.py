"""Prompt token counts at the gateway, with each model's own tokenizer (loaded once per version, lazily).

Token limits reserve prompt tokens + max_tokens before a request runs, so the count must come from the
model's tokenizer (and chat template), not an estimate. The worker's count stays authoritative for usage.
"""

from __future__ import annotations

import asyncio
import pathlib

from llmserve.admin.v1 import registry_pb2
from llmserve.common.logs import get_logger

log = get_logger(__name__)


def load_tokenizer(source: str, cache_dir: str):
    from transformers import AutoTokenizer

    from llmserve.worker.models import resolve_source
    path = resolve_source(source)
    if path.suffix == ".gguf":
        converted = pathlib.Path(cache_dir) / path.stem  # where the worker caches its de-quantized copy
        if (converted / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


class TokenCounter:
    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self._tokenizers: dict[str, object] = {}
        self._loading: dict[str, asyncio.Task] = {}

    async def _tokenizer(self, version: registry_pb2.ModelVersion):
        name = version.version
        if name in self._tokenizers:
            return self._tokenizers[name]
        if name not in self._loading:
            self._loading[name] = asyncio.create_task(
                asyncio.to_thread(load_tokenizer, version.weights_source, self.cache_dir))
        try:
            tokenizer = await asyncio.shield(self._loading[name])
        except Exception as exc:  # noqa: BLE001 - fall back to an upper-bound estimate, once logged
            log.warning("tokenizer unavailable; estimating tokens from bytes", version=name, error=str(exc))
            tokenizer = None
        self._tokenizers[name] = tokenizer
        self._loading.pop(name, None)
        return tokenizer

    def warm(self, versions) -> None:
        """Starts loading the tokenizers of these versions in the background, so first requests do not wait."""
        for version in versions:
            if version.version not in self._tokenizers and version.version not in self._loading:
                self._loading[version.version] = asyncio.create_task(
                    asyncio.to_thread(load_tokenizer, version.weights_source, self.cache_dir))

    async def count(self, version: registry_pb2.ModelVersion, *, texts=(), messages=None) -> list[int]:
        """Tokens per text, or [tokens of the templated conversation] when messages are given."""
        tokenizer = await self._tokenizer(version)
        if tokenizer is None:
            items = [" ".join(c for _, c in messages)] if messages is not None else list(texts)
            return [len(t.encode()) + 8 for t in items]  # a byte-level BPE token is at least one byte
        if messages is not None:
            conversation = [{"role": r, "content": c} for r, c in messages]
            ids = await asyncio.to_thread(tokenizer.apply_chat_template, conversation, add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            return [len(ids)]
        encoded = await asyncio.to_thread(lambda: tokenizer(list(texts), add_special_tokens=True)["input_ids"])
        return [len(ids) for ids in encoded]
