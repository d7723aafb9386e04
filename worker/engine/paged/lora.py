"""LoRA adapters in PEFT's format, applied per row on top of the shared base weights (never merged into them).

PEFT saves an adapter as `adapter_config.json` (rank `r`, `lora_alpha`, `target_modules`, ...) and
`adapter_model.safetensors` with, per adapted Linear, `...<module>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]; the adapted layer computes `x @ W.T + scaling * (x @ A.T) @ B.T`, scaling = lora_alpha / r (or
lora_alpha / sqrt(r) with `use_rslora`).

The runner multiplies by fused matrices (weights.py: qkv = [q | k | v], gate_up = [gate | up], o, down), so an
adapter is re-laid out the same way: per layer and fused matrix, one `a_t` [in, R] stacking the A of every adapted
part and one `b_t` [R, out] holding each part's scaled B in its own rows and columns (zeros elsewhere). A batch's
rows that use the adapter then cost two thin GEMMs per matrix, `(x[rows] @ a_t) @ b_t`, added to the base output;
rows of other adapters, and of the base model, are untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import torch

# PEFT module name -> (fused matrix of weights.py, part index within it)
_TARGETS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
            "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
MATRICES = ("qkv", "o", "gate_up", "down")


class AdapterError(ValueError):
    """An adapter this engine cannot apply, with what to change."""


@dataclasses.dataclass
class LoraLayer:
    # fused matrix name -> (a_t [in, R], b_t [R, out]) for the matrices the adapter touches in this layer
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Adapter:
    name: str
    rank: int
    layers: list[LoraLayer]

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for layer in self.layers for a, b in layer.matrices.values())


def _part_widths(config) -> dict[str, list[int]]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"qkv": [q, kv, kv], "o": [config.hidden_size], "gate_up": [config.intermediate_size] * 2,
            "down": [config.hidden_size]}


def _in_width(config, matrix: str) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"qkv": config.hidden_size, "o": config.num_attention_heads * head_dim,
            "gate_up": config.hidden_size, "down": config.intermediate_size}[matrix]


def load_adapter(name: str, path: pathlib.Path, config, *, dtype: torch.dtype, device: torch.device,
                 max_rank: int) -> Adapter:
    """Reads a PEFT LoRA adapter folder for a model of `config`; AdapterError says what does not fit."""
    from safetensors.torch import load_file

    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} must hold adapter_config.json and adapter_model.safetensors "
                           "(PEFT's save_pretrained format)")
    try:
        settings = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON ({exc})") from None
    if settings.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {settings.get('peft_type')!r} is not LORA")
    for flag, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (fully trained copies)"),
                       ("fan_in_fan_out", "fan_in_fan_out (Conv1D layouts)")):
        if settings.get(flag):
            raise AdapterError(f"adapter {name!r}: {what} is not supported; train a plain LoRA adapter")
    if settings.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias={settings['bias']!r} is not supported; use bias='none'")
    rank, alpha = int(settings.get("r", 8)), float(settings.get("lora_alpha", 8))
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"adapter {name!r}: rank r={rank} is over this engine's cap of {max_rank} "
                           "(worker.max_lora_rank)")
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise AdapterError(f"adapter {name!r}: per-module rank_pattern / alpha_pattern is not supported")

    tensors = load_file(str(weights_path))
    num_layers = config.num_hidden_layers
    parts: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if key.endswith(".lora_B.weight"):
                continue
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight; only q/k/v/o and "
                               "gate/up/down projections can be adapted")
        prefix = key[: -len(".lora_A.weight")]
        module = prefix.rsplit(".", 1)[-1]
        pieces = prefix.split(".")
        if module not in _TARGETS or "layers" not in pieces:
            raise AdapterError(f"adapter {name!r}: module {prefix!r} cannot be adapted here; target q_proj, k_proj, "
                               "v_proj, o_proj, gate_proj, up_proj or down_proj")
        layer = int(pieces[pieces.index("layers") + 1])
        b = tensors.get(prefix + ".lora_B.weight")
        if b is None or not 0 <= layer < num_layers:
            raise AdapterError(f"adapter {name!r}: {prefix!r} has no lora_B or names a layer the base lacks")
        matrix, part = _TARGETS[module]
        if tensor.shape != (rank, _in_width(config, matrix)) or b.shape != (_part_widths(config)[matrix][part], rank):
            raise AdapterError(f"adapter {name!r}: {prefix!r} has shapes {tuple(tensor.shape)} / {tuple(b.shape)}, "
                               "which do not fit the base model: was it trained on this base?")
        parts[(layer, matrix, part)] = (tensor, b)
    if not parts:
        raise AdapterError(f"adapter {name!r}: adapter_model.safetensors holds no LoRA weights")

    layers = []
    for layer in range(num_layers):
        matrices = {}
        for matrix in MATRICES:
            widths = _part_widths(config)[matrix]
            present = [(i, parts[(layer, matrix, i)]) for i in range(len(widths)) if (layer, matrix, i) in parts]
            if not present:
                continue
            a_t = torch.cat([a.float() for _, (a, _) in present], 0).t()  # [in, R]
            b_t = torch.zeros(rank * len(present), sum(widths))  # [R, out]
            for j, (i, (_, b)) in enumerate(present):
                start = sum(widths[:i])
                b_t[j * rank:(j + 1) * rank, start:start + widths[i]] = b.float().t() * scaling
            matrices[matrix] = (a_t.to(dtype=dtype, device=device).contiguous(),
                                b_t.to(dtype=dtype, device=device).contiguous())
        layers.append(LoraLayer(matrices))
    return Adapter(name, rank, layers)


@dataclasses.dataclass
class LoraGroup:
    """The rows of one step that use one adapter."""

    adapter: Adapter
    rows: torch.Tensor  # token rows of the step's batch, long


def apply(out: torch.Tensor, x: torch.Tensor, groups: list[LoraGroup], layer: int, matrix: str) -> torch.Tensor:
    """out[rows] += (x[rows] @ a_t) @ b_t for each group's adapter, in place (out is the base projection)."""
    for g in groups:
        pair = g.adapter.layers[layer].matrices.get(matrix)
        if pair is None:
            continue
        a_t, b_t = pair
        rows = x.index_select(0, g.rows)
        out.index_add_(0, g.rows, ((rows.to(a_t.dtype) @ a_t) @ b_t).to(out.dtype))
    return out
