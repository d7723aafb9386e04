"""Sampling: one token per row of a step's logits, greedy or by each sequence's own temperature, top-k and top-p.

Each row stands alone: a temperature too small to divide by is greedy, scores are clamped before scaling so no
parameter can overflow them, and a row the model gave NaN scores gets None (its sequence ends with an error) while
the other rows of the batch sample as usual. Rows are drawn with the exponential race (argmax of p / E, E ~ Exp(1)
from the sequence's own generator), which picks token i with probability p_i and, unlike torch.multinomial, has
no input that makes it raise.
"""

from __future__ import annotations

import logging

import torch

from .sequence import Sequence

log = logging.getLogger(__name__)

# Temperatures below this are greedy (vLLM's threshold too): scores / 1e-40 overflow float32 to inf.
MIN_TEMPERATURE = 1e-5
# |scores| are clamped to this before scaling, so that scores / MIN_TEMPERATURE stays finite (~1e9 << 3.4e38).
_MAX_ABS_SCORE = 1e4


def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
    """One token per row of logits [len(seqs), vocab]; None where the row cannot be sampled (NaN scores).

    Sampling runs on the CPU in float32 with each sequence's own generator, so a seed gives the same text
    whatever the device and whatever else is in the batch.
    """
    logits = logits.float()
    broken = torch.isnan(logits).any(-1).tolist()
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
    scores = scores.clamp(-_MAX_ABS_SCORE, _MAX_ABS_SCORE) / torch.tensor([p.temperature for p in params])[:, None]
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
