"""Sampling: one token per row of a step's logits, greedy or by each sequence's own temperature, top-k and top-p."""

from __future__ import annotations

import torch

from .sequence import Sequence


def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
    """One token per row of logits [len(seqs), vocab]: greedy where temperature is 0, else sampled.

    Sampling runs on the CPU in float32 with each sequence's own generator, so a seed gives the same text
    whatever the device and whatever else is in the batch.
    """
    tokens = logits.argmax(-1).tolist()
    rows = [i for i, seq in enumerate(seqs) if seq.params is not None and seq.params.temperature > 0]
    if not rows:
        return tokens
    params = [seqs[i].params for i in rows]
    scores = logits[rows].float().cpu()  # [R, vocab]
    scores = scores / torch.tensor([p.temperature for p in params])[:, None]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else scores.shape[-1] for p in params]).clamp(max=scores.shape[-1])
    top_p = torch.tensor([p.top_p for p in params])
    if (top_k < scores.shape[-1]).any() or (top_p < 1).any():
        sorted_scores, order = scores.sort(-1, descending=True)
        ranks = torch.arange(scores.shape[-1])[None, :]
        drop = sorted_scores < sorted_scores.gather(1, (top_k - 1)[:, None])  # below the k-th (ties stay)
        probs = sorted_scores.masked_fill(drop, float("-inf")).softmax(-1)
        # Drop a token once the more likely ones already cover top_p; the most likely one always stays.
        drop |= (probs.cumsum(-1) - probs >= top_p[:, None]) & (ranks > 0)
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    for row, i in enumerate(rows):
        tokens[i] = int(torch.multinomial(probs[row], 1, generator=seqs[i].generator))
    return tokens
