"""Prompt token counts at the gateway, with each model's own tokenizer (loaded once per version, in the background).

Two rules need the count before a request runs: a prompt longer than the version's context length is refused at
the edge, and token limits reserve prompt tokens + max_tokens. Both need the model's tokenizer (and chat
template), counting exactly as the worker will; the worker's count stays authoritative for usage. Tokenizing costs
milliseconds, so a request is counted once, and only waits for a tokenizer still loading when a limit needs it.
"""

from __future__ import annotations

import asyncio
import dataclasses

from llmserve.admin.v1 import registry_pb2
from llmserve.common.logs import get_logger
from llmserve.common.tokenizers import chat_message, chat_prompt_ids, load_version_tokenizer

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenCount:
    per_input: tuple[int, ...]  # tokens per text, or one entry for a templated conversation
    is_exact: bool  # counted by the model's tokenizer; False: an upper-bound estimate from bytes
    # The token ids per input when exact (tasks carry them, so the worker does not tokenize again).
    ids: tuple[list[int], ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def total(self) -> int:
        return sum(self.per_input)


class TokenCounter:
    def __init__(self):
        self._tokenizers: dict[str, object] = {}  # version -> tokenizer, or None when it cannot be loaded
        self._loading: dict[str, asyncio.Task] = {}

    def _start_loading(self, version: registry_pb2.ModelVersion) -> None:
        if version.version not in self._tokenizers and version.version not in self._loading:
            task = asyncio.create_task(
                asyncio.to_thread(load_version_tokenizer, version), name=f"tokenizer {version.version}")
            # A warmed version no request names is never awaited: its failure is read here (tokenizer() logs it
            # when a request needs the tokenizer), not reported by asyncio as never retrieved.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._loading[version.version] = task

    def warm(self, versions) -> None:
        """Starts loading the tokenizers of these versions in the background, so first requests do not wait."""
        for version in versions:
            self._start_loading(version)

    async def wait_warm(self, timeout_s: float) -> bool:
        """Waits for the tokenizers loading now (loaded or failed); False when some still load after timeout_s."""
        loading = [task for task in self._loading.values() if not task.done()]
        if not loading:
            return True
        _, left = await asyncio.wait(loading, timeout=timeout_s)
        return not left

    async def tokenizer(self, version: registry_pb2.ModelVersion):
        """The version's tokenizer, waiting for it to load; None when it cannot be loaded (logged once)."""
        name = version.version
        if name not in self._tokenizers:
            self._start_loading(version)
            loading = self._loading[name]
            try:
                tokenizer = await asyncio.shield(loading)
            except Exception as exc:
                log.warning("tokenizer unavailable; estimating tokens from bytes", version=name, error=str(exc))
                tokenizer = None
            self._tokenizers[name] = tokenizer
            self._loading.pop(name, None)
        return self._tokenizers[name]

    def is_ready(self, version: registry_pb2.ModelVersion) -> bool:
        """Whether counting would not wait for a tokenizer to load (starts loading it otherwise)."""
        loading = self._loading.get(version.version)
        if version.version in self._tokenizers or (loading is not None and loading.done()):
            return True
        self._start_loading(version)
        return False

    async def count(self, version: registry_pb2.ModelVersion, *, texts=(), messages=None, template=None,
                    token_ids=(), wait: bool) -> TokenCount | None:
        """Tokens per text, or of the templated conversation when messages are given (templated as `template`, a
        requests.ChatTemplate, says), or of prompts given as token ids (exact without a tokenizer). None when the
        tokenizer is still loading and `wait` is false."""
        if token_ids:
            return TokenCount(tuple(len(ids) for ids in token_ids), is_exact=True,
                              ids=tuple(list(ids) for ids in token_ids))
        if not wait and not self.is_ready(version):
            return None
        tokenizer = await self.tokenizer(version)
        if tokenizer is None:
            items = [" ".join(c for _, c in messages)] if messages is not None else list(texts)
            return TokenCount(tuple(len(t.encode()) + 8 for t in items), is_exact=False)  # a BPE token >= 1 byte
        if messages is not None:
            if template is not None:
                ids = await asyncio.to_thread(template.ids, tokenizer, messages)
            else:
                ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, [chat_message(r, c) for r, c in messages])
            return TokenCount((len(ids),), is_exact=True, ids=(ids,))
        # As the workers count: encoders add their special tokens ([CLS] ... [SEP]); a prompt is encoded raw.
        special = version.kind == registry_pb2.MODEL_KIND_EMBED
        encoded = await asyncio.to_thread(lambda: tokenizer(list(texts), add_special_tokens=special)["input_ids"])
        return TokenCount(tuple(len(ids) for ids in encoded), is_exact=True, ids=tuple(encoded))
