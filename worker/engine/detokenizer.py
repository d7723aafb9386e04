"""Streaming text out of token ids: incremental detokenization and stop strings.

Both classes keep a stream's concatenated deltas equal to the text a client would get from one final decode,
which is what lets the gateway stream and still promise the same answer as a non-streaming call.
"""

from __future__ import annotations

# Tokens of context decoded in front of the new ones: enough for tokenizers whose decode of a token depends on
# its left neighbours (leading-space handling in SentencePiece, byte pieces of one character in byte-level BPE).
_PREFIX_WINDOW = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turn generated token ids into text deltas, never emitting half of a multi-byte character.

    The vLLM/TGI technique: decode `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]`; the new text is
    the difference. While the decode ends with U+FFFD the last token holds only part of a UTF-8 sequence, so
    the delta is held back until a later token completes it.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The prompt supplies left context for the first generated tokens but is never emitted.
        self._ids: list[int] = list(prompt_token_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(len(self._ids) - _PREFIX_WINDOW, 0)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return text still held back at the end (an incomplete character decodes as U+FFFD, as in a full decode)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cut a text stream at the first stop string, without ever emitting text that a stop string later claims.

    `feed(delta)` returns (text_to_emit, stopped). The longest suffix of the pending text that is a prefix of
    some stop string is held back, so no stop string can straddle what has already been emitted.
    """

    def __init__(self, stop: list[str]):
        self._stops = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._pending += delta
        if not self._stops:
            text, self._pending = self._pending, ""
            return text, False
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            text, self._pending = self._pending[: min(hits)], ""
            self.stopped = True
            return text, True
        held = self._held_suffix_length()
        cut = len(self._pending) - held
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, False

    def flush(self) -> str:
        """Return the held-back text when the stream ends without a stop string."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _held_suffix_length(self) -> int:
        # Only suffixes shorter than the stop itself matter: a full match was handled by find() above.
        longest = min(len(self._pending), max(len(s) for s in self._stops) - 1)
        for k in range(longest, 0, -1):
            suffix = self._pending[-k:]
            if any(s.startswith(suffix) for s in self._stops):
                return k
        return 0
