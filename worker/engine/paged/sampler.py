"""Sampling: one token per row of a step's logits, greedy or by each sequence's own temperature, top-k and top-p.

Each row stands alone: a temperature too small to divide by is greedy, scores are clamped before scaling so no
parameter can overflow them, and a row the model gave NaN scores gets None (its sequence ends with an error) while
the other rows of the batch sample as usual. Rows are drawn with the exponential race (argmax of p / E, E ~ Exp(1)
from the sequence's own generator), which picks token i with probability p_i and, unlike torch.multinomial, has
no input that makes it raise.

Before that, rows whose sequence asks for it get their logits changed (a copy: the logprobs recorded beside stay
the model's own log-softmax of its raw logits), in this order: logit_bias is added; while fewer than min_tokens are
generated, end-of-sequence and stop_token_ids are masked; repetition_penalty divides positive and multiplies
negative logits of every token in the prompt or generated so far (Hugging Face and vLLM); frequency_penalty times
each token's count among the generated tokens and presence_penalty once per generated token are subtracted
(OpenAI); last, a structured-output grammar masks every token it does not allow. Rows that ask for none of these
cost nothing: a batch without them is sampled exactly as before, and in a mixed batch only the asking rows are
copied and changed.
"""

from __future__ import annotations

import dataclasses
import logging
import typing

import numpy as np
import torch

from .sequence import Sequence

log = logging.getLogger(__name__)

# Temperatures below this are greedy (vLLM's threshold too): scores / 1e-40 overflow float32 to inf.
MIN_TEMPERATURE = 1e-5
# |scores| are clamped to this before scaling, so that scores / MIN_TEMPERATURE stays finite (~1e9 << 3.4e38).
_MAX_ABS_SCORE = 1e4


@dataclasses.dataclass
class RowProcessing:
    """What a sequence's row needs before sampling, prepared once at admission (None: nothing)."""

    bias_ids: torch.Tensor | None = None  # logit_bias token ids (int64) and their biases
    bias_values: torch.Tensor | None = None
    min_tokens: int = 0
    blocked_ids: torch.Tensor | None = None  # masked until min_tokens are generated: EOS and stop_token_ids
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    matcher: typing.Any = None  # common.structured.Matcher: this sequence's grammar state


def row_processing(params, eos_token_ids: set[int], matcher=None) -> RowProcessing | None:
    """The row processing a sequence's SamplingParams ask for; None when they ask for none."""
    if params is None:
        return None
    row = RowProcessing(matcher=matcher)
    if params.logit_bias:
        row.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        row.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
    if params.min_tokens > 0:
        row.min_tokens = params.min_tokens
        row.blocked_ids = torch.tensor(sorted(set(eos_token_ids) | set(params.stop_token_ids)), dtype=torch.long)
    if params.repetition_penalty > 0 and params.repetition_penalty != 1.0:
        row.repetition_penalty = float(params.repetition_penalty)
    row.presence_penalty, row.frequency_penalty = float(params.presence_penalty), float(params.frequency_penalty)
    if (row.bias_ids is None and not row.min_tokens and row.repetition_penalty == 1.0 and not row.presence_penalty
            and not row.frequency_penalty and matcher is None):
        return None
    return row


def _fill_masks(matchers: list, vocab: int) -> np.ndarray:
    """The allowed tokens [len(matchers), vocab] (bool, numpy) of each matcher's next step.

    Row by row on this thread, and unpacked with numpy: llguidance's own thread pool (LLExecutor), and torch's
    multi-threaded small ops, both fight the step's OpenMP threads for the cores (bench/structured.py)."""
    bitmask = torch.zeros((len(matchers), (vocab + 31) // 32), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask, row)
    # Token 32 w + b is bit b of word w: little-endian bytes, bits unpacked least significant first.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab].astype(bool)


def process_rows(seqs: list[Sequence], logits: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """(logits with each asking row's processing applied, out of place; whether each row's grammar allows no
    token at all: a dead end). Rows that ask for nothing are not touched; with none asking, logits come back as
    they are. The work is numpy's on the CPU: one thread, where torch's small multi-threaded ops would each wait on
    the step's OpenMP team (on a loaded 2-core machine, about 10 ms an op)."""
    dead = [False] * len(seqs)
    rows = [i for i, seq in enumerate(seqs) if seq.processing is not None]
    if not rows:
        return logits, dead
    out = logits.detach().cpu().numpy().copy()  # the caller's logits (the model's own, for logprobs) stay as they are
    vocab = out.shape[-1]
    constrained: list[int] = []
    for i in rows:
        seq, row = seqs[i], typing.cast(RowProcessing, seqs[i].processing)
        scores = out[i]  # a view into out
        if row.bias_ids is not None and row.bias_values is not None:
            scores[row.bias_ids.numpy()] += row.bias_values.numpy()  # ids are unique (a map's keys)
        if row.blocked_ids is not None and seq.num_completion_tokens < row.min_tokens:
            scores[row.blocked_ids.numpy()] = -np.inf
        if row.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.token_ids, dtype=np.int64))
            values = scores[seen]
            scores[seen] = np.where(values > 0, values / row.repetition_penalty, values * row.repetition_penalty)
        if (row.presence_penalty or row.frequency_penalty) and seq.num_completion_tokens:
            counts = np.bincount(np.asarray(seq.token_ids[seq.num_prompt_tokens:], dtype=np.int64),
                                 minlength=vocab)[:vocab].astype(np.float32)
            scores -= counts * np.float32(row.frequency_penalty) + (counts > 0) * np.float32(row.presence_penalty)
        if row.matcher is not None:
            if row.matcher.error:  # a failed matcher would allow only end-of-sequence: a dead end, not a stop
                dead[i] = True
                continue
            constrained.append(i)
    if constrained:
        matchers = [typing.cast(RowProcessing, seqs[i].processing).matcher for i in constrained]
        allowed = _fill_masks(matchers, vocab)
        for i, mask in zip(constrained, allowed):
            dead[i] = not mask.any()
            np.putmask(out[i], ~mask, -np.inf)
    return torch.from_numpy(out), dead


def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
    """One token per row of logits [len(seqs), vocab]; None where the row cannot be sampled (NaN scores, or a
    grammar that allows no token: the sequence's dead_end is then set).

    Sampling runs on the CPU in float32 with each sequence's own generator, so a seed gives the same text
    whatever the device and whatever else is in the batch.
    """
    logits, dead = process_rows(seqs, logits.float())
    broken = torch.isnan(logits).any(-1).tolist()
    for i, is_dead in enumerate(dead):
        if is_dead:
            broken[i] = True
            seqs[i].dead_end = True
    tokens: list[int | None] = [None if bad else token for bad, token in zip(broken, logits.argmax(-1).tolist())]
    rows = [i for i, seq in enumerate(seqs)
            if not broken[i] and seq.params is not None and seq.params.temperature >= MIN_TEMPERATURE]
    if not rows:
        return tokens
    try:
        drawn = _draw(logits[rows].cpu(), [seqs[i] for i in rows])
    except Exception:  # one row's parameters broke the batched draw: draw row by row, failing only that row
        log.exception("batched sampling failed; sampling row by row")
        drawn = [_draw_alone(logits[i:i + 1].cpu(), seqs[i]) for i in rows]
    for i, token in zip(rows, drawn):
        tokens[i] = token
    return tokens


def _draw_alone(logits: torch.Tensor, seq: Sequence) -> int | None:
    try:
        return _draw(logits, [seq])[0]
    except Exception:
        log.exception("sampling failed for one sequence")
        return None


def _draw(scores: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
    params = [seq.params for seq in seqs]
    vocab = scores.shape[-1]
    # Masked tokens (-inf: a grammar's, min_tokens') stay impossible after the clamp.
    scores = (scores.clamp(-_MAX_ABS_SCORE, _MAX_ABS_SCORE).masked_fill(scores == float("-inf"), float("-inf"))
              / torch.tensor([p.temperature for p in params])[:, None])
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params]).clamp(1, vocab)
    top_p = torch.tensor([p.top_p for p in params])
    if (top_k < vocab).any() or (top_p < 1).any():
        sorted_scores, order = scores.sort(-1, descending=True)
        ranks = torch.arange(vocab)[None, :]
        drop = sorted_scores < sorted_scores.gather(1, (top_k - 1)[:, None])  # below the k-th (ties stay)
        probs = sorted_scores.masked_fill(drop, float("-inf")).softmax(-1)
        # Drop a token once the more likely ones already cover top_p; the most likely one always stays.
        drop |= (probs.cumsum(-1) - probs >= top_p[:, None]) & (ranks > 0)
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)  # finite: every row keeps its top token, and scores are bounded
    race = torch.empty_like(probs)
    for row, seq in enumerate(seqs):
        race[row].exponential_(generator=seq.generator)
    return [int(t) for t in (probs / race).argmax(-1).tolist()]


def skip_draws(seq: Sequence, num_tokens: int, vocab: int) -> None:
    """Advance a seeded sequence's generator past the draws of num_tokens sampled tokens (one Exp(1) row of the
    vocabulary each, as _draw takes them), so that a stream migrated with those tokens samples on exactly as the
    lost worker would have."""
    if seq.generator is None or seq.params is None or seq.params.temperature < MIN_TEMPERATURE:
        return
    row = torch.empty(vocab)
    for _ in range(num_tokens):
        row.exponential_(generator=seq.generator)
