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

import dataclasses
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import lora as lora_mod
from .block_manager import allocate_kv_cache
from .sequence import Sequence
from .step_scheduler import ScheduledBatch
from .weights import pack_weights


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
    lora: list[lora_mod.LoraGroup] = dataclasses.field(default_factory=list)  # rows by adapter (none: base only)
    # Sequences that need their prompt's logits: (batch index, first flat row, first position, prompt rows).
    prompt_rows: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)


@dataclass
class PromptLogits:
    """The logits of a sequence's prompt rows computed this step: row r predicts the token at position start + r + 1."""

    index: int  # in the batch
    start: int  # position of the first row
    logits: torch.Tensor  # [rows, vocab]


@dataclass
class StepResult:
    sampled: list[int]  # batch indices of the sequences to sample
    logits: torch.Tensor  # [num_sampled, vocab]
    prompt_logits: list[PromptLogits]  # only for sequences that ask for prompt logprobs


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


def _roll_half(x: torch.Tensor) -> torch.Tensor:
    """[x2, x1] for x = [x1, x2] on the last dim (rotate_half without its negation, which moves into sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


QUANTIZATIONS = ("", "int8")  # "" none; "int8": int8 weight-only (per output channel) next to the bf16 weights


def _int8(quantization: str) -> bool:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {list(QUANTIZATIONS)}")
    return quantization == "int8"


class ModelRunner:
    def __init__(self, model, *, num_blocks: int, block_size: int, quantization: str = ""):
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
        self.scaling = self.body.layers[0].self_attn.scaling
        self.weights = pack_weights(model)  # the model's own weights, re-laid out in place (weights.py)
        with torch.inference_mode():
            self.matmul = Matmuls(self.weights, self.dtype, self.device, int8=_int8(quantization))
            # Half-precision models keep the residual stream in fp32 (projections still read and write bf16):
            # adding each layer's bf16 output to a bf16 residual rounds Llama's large residuals every time, and that
            # error, not the matmuls', moved SmolLM2's logits furthest from fp32 (1.7% mean error -> 0.7%).
            self.residual_fp32 = self.dtype != torch.float32 and self.device.type == "cpu"

    # ---- inputs ----

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        # Decodes first, shortest context first, so that similar lengths sit next to each other for grouping.
        order = sorted(range(len(batch.seqs)),
                       key=lambda i: (batch.num_new_tokens[i] != 1, batch.seqs[i].num_computed_tokens))
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables, decode_lens, prefills = [], [], []
        last_row = {}
        prompt_rows: list[tuple[int, int, int, int]] = []
        adapter_rows: dict[str, tuple[lora_mod.Adapter, list[int]]] = {}
        for i in order:
            seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            row = len(input_ids)
            if seq.adapter is not None:
                adapter_rows.setdefault(seq.adapter.name, (seq.adapter, []))[1].extend(range(row, row + num_new))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            last_row[i] = row + num_new - 1
            if seq.needs_prompt_logits and start < seq.num_prompt_tokens:
                prompt_rows.append((i, row, start, min(end, seq.num_prompt_tokens) - start))
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
                          tensor([last_row[i] for i in sampled]), sampled,
                          [lora_mod.LoraGroup(adapter, tensor(rows)) for adapter, rows in adapter_rows.values()],
                          prompt_rows)

    # ---- forward ----

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor]:
        """Run one step; return (batch indices of the sequences to sample, their logits [num_sampled, vocab])."""
        result = self.run(batch)
        return result.sampled, result.logits

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        """Run one step: the sampled rows' logits, and every prompt row's of the sequences that need them (the
        other rows cost nothing more: only the rows asked for go through the LM head)."""
        inputs = self.prepare(batch)
        hidden = self._forward(inputs)
        prompt_logits = [PromptLogits(i, start, self._logits(hidden[row:row + num]))
                         for i, row, start, num in inputs.prompt_rows]
        if not inputs.sampled:
            return StepResult([], hidden.new_empty((0, self.config.vocab_size)), prompt_logits)
        return StepResult(inputs.sampled, self._logits(hidden[inputs.logits_rows]), prompt_logits)

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], block_table: list[int]) -> torch.Tensor:
        """log P(token i | tokens < i) for i = 1..T-1 of a fresh sequence prefilled in one step (through the
        blocks of block_table, which it overwrites): the model's own log-softmax, as the engine's head computes it,
        for perplexity and prompt scoring."""
        seq = Sequence(list(token_ids))
        seq.block_table = list(block_table)
        inputs = self.prepare(ScheduledBatch([seq], [len(token_ids)]))
        logits = self._logits(self._forward(inputs)[:-1]).float()
        targets = torch.tensor(token_ids[1:], device=logits.device)
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head over the rows of hidden: [rows, vocab]."""
        w = self.weights
        if self.residual_fp32:
            hidden = _rms_norm(w.norm, hidden, out_dtype=torch.float32)
            logits = self.matmul(hidden.to(self.dtype), w.lm_head_t, w.lm_head_bias)
            return _refine_top_logits(logits, hidden, w.lm_head_t, w.lm_head_bias)
        return self.matmul(_rms_norm(w.norm, hidden), w.lm_head_t, w.lm_head_bias)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """The decoder layers over the step's tokens: the last hidden states [num_tokens, hidden]."""
        w = self.weights
        hidden = F.embedding(inputs.input_ids, w.embed)  # [num_tokens, hidden]
        cos, sin = self.body.rotary_emb(hidden, inputs.positions[None])  # [1, num_tokens, head_dim]
        if self.residual_fp32:
            hidden = hidden.float()
        # x * cos + rotate_half(x) * sin == x * cos + roll(x, half) * sin_signed: one rotary over q and k together
        half = self.head_dim // 2
        cos = cos[0, :, None, :]  # [num_tokens, 1, head_dim]
        sin = torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), dim=-1)
        for layer_idx, lw in enumerate(w.layers):
            hidden = self._attention(layer_idx, lw, hidden, cos, sin, inputs)  # residual added in o_proj's GEMM
            hidden = self._mlp(layer_idx, lw, hidden, inputs.lora)
        return hidden

    def _mlp(self, layer_idx: int, lw, residual: torch.Tensor, lora: list[lora_mod.LoraGroup]) -> torch.Tensor:
        """residual + MLP(post_attention_layernorm(residual)), with each row's LoRA adapter (if any)."""
        x = _rms_norm(lw.post_norm, residual, out_dtype=self.dtype)
        gate_up = self.matmul(x, lw.gate_up_t, None)
        if lora:
            lora_mod.apply(gate_up, x, lora, layer_idx, "gate_up")
        gate, up = gate_up[:, :lw.intermediate], gate_up[:, lw.intermediate:]
        act = lw.act_fn(gate) * up
        out = self.matmul.add(residual, act, lw.down_t, None)
        return lora_mod.apply(out, act, lora, layer_idx, "down") if lora else out

    def _attention(self, layer_idx: int, lw, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   inputs: StepInputs) -> torch.Tensor:
        """residual + self-attention(input_layernorm(residual)) over the paged cache."""
        num_tokens = residual.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        x = _rms_norm(lw.input_norm, residual, out_dtype=self.dtype)
        qkv = self.matmul(x, lw.qkv_t, lw.qkv_bias)
        if inputs.lora:
            lora_mod.apply(qkv, x, inputs.lora, layer_idx, "qkv")
        qkv = qkv.view(num_tokens, heads + 2 * kv_heads, head_dim)
        qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads:]
        if lw.q_norm is not None:  # Qwen3-style per-head norms before the rotary embedding
            qk = torch.cat((lw.q_norm(qk[:, :heads]), lw.k_norm(qk[:, heads:])), dim=1)
        qk = qk * cos + _roll_half(qk) * sin  # [T, heads + kv_heads, head_dim]
        q, k = qk[:, :heads], qk[:, heads:]
        kv_cache = self.kv_cache[layer_idx]  # [2, num_blocks, block_size, kv_heads, head_dim]
        k_cache, v_cache = kv_cache
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, inputs.slot_mapping, k)
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, inputs.slot_mapping, v)

        out = q.new_empty(q.shape)  # [T, heads, head_dim]
        scale = self.scaling
        for g in inputs.decode_groups:
            n, num_slots = g.end - g.start, g.mask.shape[-1]
            # [rows, kv_heads, group's max context, head_dim]
            # One index_select gathers the group's K and V blocks (faster copies than advanced indexing here).
            kv = kv_cache.index_select(1, g.block_tables.view(-1)).view(2, n, num_slots, kv_heads, head_dim)
            keys, values = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
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
                keys = k_cache[p.block_ids].view(-1, kv_heads, head_dim)[: p.num_context_tokens]
                values = v_cache[p.block_ids].view(-1, kv_heads, head_dim)[: p.num_context_tokens]
                o = F.scaled_dot_product_attention(query, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                                   attn_mask=p.mask, scale=scale, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1)
        attended = out.view(num_tokens, -1)
        result = self.matmul.add(residual, attended, lw.o_t, lw.o_bias)
        return lora_mod.apply(result, attended, inputs.lora, layer_idx, "o") if inputs.lora else result


def _onednn_linear():
    """oneDNN's linear (aten's mkldnn._linear_pointwise) if this torch has it and it computes x @ W.T."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(3, 4)
        return op if torch.equal(op(x, w.t(), None, "none", [], ""), x @ w) else None
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_linear()
# Row counts the calibration tries (one per bucket: rows below the next bucket's floor use this bucket's choice).
_ROW_BUCKETS = (1, 2, 8, 32, 128)


def _bucket(rows: int) -> int:
    return sum(rows >= b for b in _ROW_BUCKETS) - 1


class Matmuls:
    """x @ Wt for the runner's packed weights, by the fastest CPU kernel for the number of rows.

    MKL's GEMM (x @ Wt, addmm) and oneDNN's linear differ severalfold by machine, dtype and rows: on a 2-core AMD
    EPYC oneDNN ran fp32 at 2-63 rows ~1.5x faster and MKL the rest; on a 2-core Xeon with AMX, MKL wins fp32 at
    every row count (a 4-row step's linears 14 ms vs 25). For bf16 and fp16 oneDNN gets each weight reordered once
    into its own blocked layout (what Inductor's CPU backend does when it freezes a model): over 30 layers' linears
    on that Xeon, 12.8 ms at 1 row and 14.3 at 16 against 19.5 and 20.5 for bf16 F.linear and 16.5 and 46 for fp32
    (those copies cost the layers' weight memory once more; the plain ones stay, Hugging Face's modules view them).
    With int8=True each weight is also quantized to int8 per output channel (symmetric, weight-only) for aten's
    _weight_int8pack_mm with bf16 activations: it reads a quarter of fp32's bytes, so it wins at few rows, and loses
    at many (no AMX path: 16 rows ran 31 ms against bf16's 14), where the bf16 weights serve; int8 mode skips the
    oneDNN copies, so it holds 1.5x the bf16 weight bytes.
    The runner times every kernel once, at start, on one layer's weights per row bucket (alternating them, about
    0.3 s), and keeps the fastest where it beats the default (below) by a margin; CUDA, and kernels that fail to
    build (oneDNN has no primitive for some dtype and layout pairs), use x @ Wt.
    """

    def __init__(self, weights, dtype: torch.dtype, device: torch.device, *, int8: bool = False):
        self.kernels: dict[str, typing.Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]]
        self.kernels = {"mkl": _mkl}
        self.choice = ["mkl"] * len(_ROW_BUCKETS)  # the kernel of each row bucket
        self.default = "mkl"
        self.fuse_add = dtype == torch.float32
        self._onednn_weight: dict[int, torch.Tensor] = {}  # id(weight_t) -> the weight oneDNN multiplies by
        self._int8_weight: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight_t) -> (int8, scales)
        if device.type != "cpu":
            return
        matrices = [m for lw in weights.layers for m in (lw.qkv_t, lw.o_t, lw.gate_up_t, lw.down_t)]
        matrices.append(weights.lm_head_t)
        if int8:
            if dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"int8 weights need bf16 or fp16 activations, not {dtype}")
            for m in matrices:
                self._int8_weight[id(m)] = _quantize_int8(m)
            self.kernels["int8"] = self._int8
        elif _LINEAR is not None:
            try:
                for m in matrices:
                    self._onednn_weight[id(m)] = _onednn_weight(m)
                self.kernels["onednn"] = self._onednn
            except RuntimeError:  # this torch cannot reorder the dtype: MKL only
                self._onednn_weight.clear()
        # What a row bucket uses unless another kernel measures clearly faster: the reordered oneDNN weights for half
        # types (faster at every row count on both machines we measured), else MKL.
        self.default = "onednn" if "onednn" in self.kernels and dtype != torch.float32 else "mkl"
        self.choice = [self.default] * len(_ROW_BUCKETS)
        if len(self.kernels) > 1:
            self._calibrate(weights.layers[0], dtype, device)

    def _calibrate(self, layer, dtype: torch.dtype, device: torch.device) -> None:
        pairs = [(layer.qkv_t, layer.qkv_bias), (layer.o_t, layer.o_bias), (layer.gate_up_t, None),
                 (layer.down_t, None)]
        for i, rows in enumerate(_ROW_BUCKETS):
            cases = [(torch.randn(rows, w.shape[0], dtype=dtype, device=device), w, b) for w, b in pairs]
            runs = {name: _run_all(kernel, cases) for name, kernel in self.kernels.items()}
            for name, run in list(runs.items()):
                try:
                    run()
                except RuntimeError:  # e.g. oneDNN's "could not create a primitive descriptor"
                    del runs[name]
            times = _race(runs)
            best = min(times, key=times.__getitem__)
            default = self.default if self.default in times else "mkl"
            self.choice[i] = best if times[best] < times[default] * (1 - _MARGIN) else default

    def _onednn(self, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        assert _LINEAR is not None
        return _LINEAR(x, self._onednn_weight[id(weight_t)], bias, "none", [], "")

    def _int8(self, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight, scales = self._int8_weight[id(weight_t)]
        out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales)
        return out if bias is None else out + bias

    def __call__(self, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bucket = _bucket(x.shape[0])
        name = self.choice[bucket]
        if name != "mkl":
            try:
                return self.kernels[name](x, weight_t, bias)
            except RuntimeError:  # no primitive for this shape after all: MKL from now on
                self.choice[bucket] = "mkl"
        return _mkl(x, weight_t, bias)

    def add(self, residual: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        """residual + x @ weight_t (+ bias). In fp32 the add is fused into MKL's GEMM (addmm). In bf16 it is not:
        adding the rounded product to the residual, as Hugging Face does, kept SmolLM2's logits closer to fp32's
        (1.7% mean error over 5 chat prompts, every greedy token right) than one fused rounding (addmm, or oneDNN's
        sum post-op: 2.8%, and one greedy answer wrong)."""
        if self.fuse_add and bias is None and self.choice[_bucket(x.shape[0])] == "mkl":
            return torch.addmm(residual, x, weight_t)
        return residual + self(x, weight_t, bias)


REFINED_LOGITS = 8


def _refine_top_logits(logits: torch.Tensor, hidden: torch.Tensor, weight_t: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits whose top REFINED_LOGITS per row are recomputed in fp32 from the fp32 hidden state.

    bf16 logits near 25 are rounded to steps of 0.125, so close candidates tie and greedy answers flip (SmolLM2's
    "The" and "L" for "What is the capital of France?" are 0.09 apart in fp32, and tie in bf16). Recomputing the
    few candidates that can win costs a [rows, 8] gather-and-dot instead of an fp32 lm_head (10 ms at 16 rows)."""
    logits = logits.float()
    top = logits.topk(min(REFINED_LOGITS, logits.shape[-1]), dim=-1).indices  # [rows, k]
    columns = weight_t[:, top.reshape(-1)].float().view(weight_t.shape[0], *top.shape)  # [hidden, rows, k]
    exact = torch.einsum("rh,hrk->rk", hidden, columns)
    if bias is not None:
        exact = exact + bias.float()[top]
    return logits.scatter_(1, top, exact)


def _run_all(kernel, cases: list) -> typing.Callable[[], object]:
    return lambda: [kernel(x, w, b) for x, w, b in cases]


def _onednn_weight(weight_t: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight oneDNN's linear takes: a view for fp32, a copy reordered into oneDNN's blocked layout
    for half types (the batch-size hint changes little: 1-256 rows run within 10% of their best with 16)."""
    if weight_t.dtype == torch.float32:
        return weight_t.t()
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous(), 16)


def _quantize_int8(weight_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a [in, out] weight: ([out, in] int8, [out] scales in its dtype)."""
    w = weight_t.t().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    return q, scales.to(weight_t.dtype)


def _mkl(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)


# Another kernel must beat MKL by this share to be used: the measurement runs while the rest of a mesh may be
# starting on the same cores, and a wrong choice costs up to 2x (oneDNN's 1-row fp32 GEMV is half as fast as MKL's).
_MARGIN = 0.1


def _race(runs: dict[str, typing.Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    """Least seconds of each run, timed alternately (a b c a b c ...) after a warm-up, so that a burst of other load
    on the machine slows all of them rather than one; the least time of each is its undisturbed speed."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _rms_norm(norm, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """HF's LlamaRMSNorm in one op (fp32 statistics, then the weight), as out_dtype (default x's). With an fp32 x and
    a half-precision norm it follows HF's order: normalise in fp32, round, then multiply by the weight; other norm
    modules are called as they are."""
    out_dtype = out_dtype or x.dtype
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or type(norm).__name__ not in _PLAIN_RMS_NORMS:
        return norm(x).to(out_dtype)
    weight = norm.weight
    if x.dtype == weight.dtype:
        return F.rms_norm(x, weight.shape, weight, eps).to(out_dtype)
    if out_dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight.float(), eps)
    return F.rms_norm(x, weight.shape, None, eps).to(weight.dtype) * weight


_PLAIN_RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
