"""Runs a Hugging Face Llama-family model over the paged KV cache, one scheduled batch per call.

The model's own modules supply the weights (embedding, projections, norms, MLPs, rotary embedding, lm_head);
the forward pass here replaces HF's attention and cache classes. All scheduled tokens travel as one flat batch
[num_tokens, hidden] through the projections and MLPs, which is where the FLOPs are. Attention is split:
  decode rows (one new token each) attend in a few groups of similar context length: per group and layer one
    gather of their blocks into a padded [rows, group's max context, ...] tensor and one
    scaled_dot_product_attention call with a length mask (grouping keeps the padding, which costs as much as
    real slots, small when lengths are mixed);
  prompt chunks attend one sequence at a time: a fresh prompt over its own new K/V (plain causal), a later
    chunk over the gathered cache with the causal mask shifted by the tokens already computed.
New K/V are written into their slots (block_table[pos // block_size] * block_size + pos % block_size) before
attention reads them, so the same pass serves prompt chunks and decodes alike, on CPU or CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_manager import allocate_kv_cache
from .step_scheduler import ScheduledBatch


@dataclass
class _Prefill:
    """One prompt chunk: its tokens' place in the flat batch and what it attends over."""

    start: int  # first row in the flat batch
    num_new_tokens: int
    num_context_tokens: int  # computed before this step + new
    block_ids: torch.Tensor | None  # [num_blocks] when earlier tokens are in the cache, else None
    mask: torch.Tensor | None  # [num_new_tokens, num_context_tokens] bool, True = may attend


@dataclass
class _DecodeGroup:
    """Decode rows of similar context length, attended together (padding only to the group's longest)."""

    start: int  # first row in the flat batch
    end: int
    block_tables: torch.Tensor  # [rows, max_num_blocks], padded with block 0
    mask: torch.Tensor  # [rows, 1, 1, max_num_blocks * block_size] bool


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    slot_mapping: torch.Tensor  # [num_tokens]
    decode_groups: list[_DecodeGroup]  # the first rows of the batch are single-token rows, shortest first
    prefills: list[_Prefill]
    logits_rows: torch.Tensor  # [num_sampled] flat rows whose logits are sampled (each sequence's last token)
    sampled: list[int]  # batch indices of those sequences, in the same order


def _length_groups(lengths: list[int], max_groups: int = 4, group_cost: int = 512) -> list[tuple[int, int]]:
    """Splits sorted decode lengths into at most max_groups contiguous groups, minimising the attended slots
    (rows x the group's longest length) plus `group_cost` slots per extra group (one more gather and attention
    call per layer). Padded slots cost as much as real ones, so one group for mixed lengths wastes most of it."""
    n = len(lengths)
    if n == 0:
        return []
    inf = float("inf")
    # best[g][i]: least cost of the first i rows in g groups; cut[g][i]: where the last of those groups starts
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for i in range(1, n + 1):
            for j in range(g - 1, i):
                cost = best[g - 1][j] + (i - j) * lengths[i - 1] + group_cost
                if cost < best[g][i]:
                    best[g][i], cut[g][i] = cost, j
    groups = min(range(1, max_groups + 1), key=lambda g: best[g][n])
    bounds, i = [n], n
    for g in range(groups, 0, -1):
        i = cut[g][i]
        bounds.append(i)
    bounds.reverse()
    return list(zip(bounds, bounds[1:]))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModelRunner:
    def __init__(self, model, *, num_blocks: int, block_size: int):
        self.model, self.config = model, model.config
        self.body = model.model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = self.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv_cache = allocate_kv_cache(config, num_blocks, block_size, self.dtype, self.device)

    # ---- inputs ----

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        # Decodes first, shortest context first, so that similar lengths sit next to each other for grouping.
        order = sorted(range(len(batch.seqs)),
                       key=lambda i: (batch.num_new_tokens[i] != 1, batch.seqs[i].num_computed_tokens))
        input_ids, positions, slots = [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        last_row = {}
        for i in order:
            seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            last_row[i] = row + num_new - 1
            if num_new == 1:
                decode_tables.append(table[: (end + bs - 1) // bs])
                decode_lens.append(end)
            elif start == 0:
                prefills.append(_Prefill(row, num_new, end, None, None))
            else:
                block_ids = torch.tensor(table[: (end + bs - 1) // bs])
                mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
                prefills.append(_Prefill(row, num_new, end, block_ids.to(self.device), mask.to(self.device)))
        decode_groups = []
        for start, end in _length_groups(decode_lens):
            tables = decode_tables[start:end]
            max_num_blocks = max(len(t) for t in tables)
            block_tables = torch.tensor([t + [0] * (max_num_blocks - len(t)) for t in tables])
            lens = torch.tensor(decode_lens[start:end])
            mask = (torch.arange(max_num_blocks * bs)[None, :] < lens[:, None])[:, None, None, :]
            decode_groups.append(_DecodeGroup(start, end, block_tables.to(self.device), mask.to(self.device)))
        sampled = [i for i in range(len(batch.seqs)) if batch.is_sampled(i)]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        return StepInputs(tensor(input_ids), tensor(positions), tensor(slots), decode_groups, prefills,
                          tensor([last_row[i] for i in sampled]), sampled)

    # ---- forward ----

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor]:
        """Run one step; return (batch indices of the sequences to sample, their logits [num_sampled, vocab])."""
        inputs = self.prepare(batch)
        hidden = self.body.embed_tokens(inputs.input_ids)  # [num_tokens, hidden]
        cos, sin = self.body.rotary_emb(hidden, inputs.positions[None])  # [1, num_tokens, head_dim]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [num_tokens, 1, head_dim]
        for layer_idx, layer in enumerate(self.body.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = self._attention(layer_idx, layer.self_attn, hidden, cos, sin, inputs)
            hidden = residual + hidden
            residual = hidden
            hidden = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + hidden
        if not inputs.sampled:
            return [], hidden.new_empty((0, self.config.vocab_size))
        hidden = self.body.norm(hidden[inputs.logits_rows])  # [num_sampled, hidden]
        return inputs.sampled, self.model.lm_head(hidden)  # [num_sampled, vocab]

    def _attention(self, layer_idx: int, attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   inputs: StepInputs) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = attn.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        k = attn.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        v = attn.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before the rotary embedding
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache, v_cache = self.kv_cache[layer_idx]  # [num_blocks, block_size, kv_heads, head_dim] each
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, inputs.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, inputs.slot_mapping, v)

        out = torch.empty_like(q)  # [T, heads, head_dim]
        scale = attn.scaling
        for g in inputs.decode_groups:
            n, num_slots = g.end - g.start, g.mask.shape[-1]
            # [rows, kv_heads, group's max context, head_dim]
            blocks = g.block_tables.view(-1)  # index_select copies faster than advanced indexing here
            keys = k_cache.index_select(0, blocks).view(n, num_slots, self.num_kv_heads, -1).transpose(1, 2)
            values = v_cache.index_select(0, blocks).view(n, num_slots, self.num_kv_heads, -1).transpose(1, 2)
            out[g.start:g.end] = F.scaled_dot_product_attention(
                q[g.start:g.end, :, None, :], keys, values, attn_mask=g.mask, scale=scale, enable_gqa=True,
            )[:, :, 0, :]
        for p in inputs.prefills:
            rows = slice(p.start, p.start + p.num_new_tokens)
            query = q[rows].transpose(0, 1)[None]  # [1, heads, new, head_dim]
            if p.block_ids is None:  # a fresh prompt: its own K/V, plain causal
                keys, values = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
            else:  # a later chunk: everything in the cache so far, causal mask shifted by the computed tokens
                keys = k_cache[p.block_ids].view(-1, self.num_kv_heads, self.head_dim)[: p.num_context_tokens]
                values = v_cache[p.block_ids].view(-1, self.num_kv_heads, self.head_dim)[: p.num_context_tokens]
                o = F.scaled_dot_product_attention(query, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                                   attn_mask=p.mask, scale=scale, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1)
        return attn.o_proj(out.view(num_tokens, -1))
