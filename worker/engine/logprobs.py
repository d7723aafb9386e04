"""Log probabilities of tokens, as OpenAI's logprobs report them: the model's own log-softmax of its raw logits
(before temperature, top-p and top-k, as vLLM reports them), with each token's bytes and the top alternatives.

Token bytes come from the tokenizer's vocabulary, not from decoding one token alone: a byte-level BPE token may
hold part of a UTF-8 character ("bytes:\\xe2\\x80" in OpenAI's completions), which a lone decode turns into U+FFFD.
"""

from __future__ import annotations

import functools
import re

import torch

from .contract import TokenLogprob, TopLogprob

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback pieces


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table (byte-level BPE spells every byte as one of these)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(visible), 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars)}


class TokenBytes:
    """token id -> its bytes, for byte-level BPE (GPT-2, Llama 3, SmolLM2) and SentencePiece vocabularies."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        vocab = tokenizer.get_vocab()
        self._is_byte_level = any("Ġ" in piece for piece in vocab)  # GPT-2's spelling of a leading space
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._bytes(token_id)
        return found

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if token_id in self._special:
            return piece.encode()
        if self._is_byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode()  # an added token spelled as text
        if (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def token_logprobs(logits: torch.Tensor, targets: list[int], num_top: int, token_bytes: TokenBytes
                   ) -> list[TokenLogprob]:
    """One entry per row of logits [rows, vocab]: the log probability of targets[row] and the num_top most likely
    tokens, from the log-softmax of the raw logits in float32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
    if num_top > 0:
        top_values, top_ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
        tops = list(zip(top_ids.tolist(), top_values.tolist()))
    else:
        tops = [([], [])] * len(targets)
    return [TokenLogprob(token, value, token_bytes(token),
                         [TopLogprob(t, v, token_bytes(t)) for t, v in zip(ids, values)])
            for token, value, (ids, values) in zip(targets, chosen, tops)]
