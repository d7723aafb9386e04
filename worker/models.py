"""Locating and loading model weights for the worker.

Weights are named by source strings so that configs can point inside installed Python packages (the only way
models reach these machines) as easily as at plain folders:

    pkg:<python_module>/<relative path>   a file or folder inside an installed package
    pkg:<python_module>                   the package folder itself
    file:<absolute path> | <absolute path>

A `.gguf` source is de-quantized once into a safetensors folder under `cache_dir`: loading a GGUF through
transformers takes ~17 s for SmolLM2-135M, the cached copy loads in under 2 s with identical output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmserve.common.sources import ModelLoadError, resolve_source

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
AUTO = "auto"


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """The dtype to load weights in: `dtype` itself, or for "auto" bfloat16 where the device computes it fast (a
    CUDA GPU with bf16, or a CPU with AMX tiles, where oneDNN's bf16 kernels ran a decode step 1.1-2x and a prompt
    2x faster than fp32), else float32 (CPUs without AMX run bf16 matmuls slower than fp32 at small batches)."""
    if dtype != AUTO:
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    fast_bf16 = bool(amx and amx()) and torch.backends.mkldnn.is_available()
    return "bfloat16" if fast_bf16 else "float32"


def load_generation_model(source: str, cache_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM and its tokenizer from a GGUF file (cached as safetensors) or a HF folder.

    Returns (model, tokenizer) with the model in eval mode on `device`.
    """
    # Imported here: transformers takes seconds to import, and resolve_source users should not pay for it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted([*DTYPES, AUTO])}")
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        path = _convert_gguf(path, Path(cache_dir))
    elif not (path.is_dir() and (path / "config.json").exists()):
        raise ModelLoadError(f"weights source {source!r}: {path} is neither a .gguf file nor a folder with config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as exc:  # transformers raises many types; callers need one
        raise ModelLoadError(f"cannot load generation model from {path}: {exc}") from exc
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]  # transformers' to() stub wants a model


def load_embedding_model(source: str, device: str = "cpu"):
    """Load an encoder (e.g. all-MiniLM-L6-v2) and its tokenizer; returns (model, tokenizer) in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_source(source)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"weights source {source!r}: {path} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load embedding model from {path}: {exc}") from exc
    return model.to(device).eval(), tokenizer


def _convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """De-quantize `gguf_path` into `cache_dir/<stem>/` once; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / gguf_path.stem
    if (target / "config.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors under %s (one-off, ~20 s)", gguf_path, target)
    # Build in a temp folder next to the target and rename: a crash never leaves a half-written cache that a
    # later start would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf_path.stem}.", dir=cache_dir))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
        # The GGUF-loaded config carries a quantization_config; saving it would make from_pretrained expect a
        # GGUF again, so rebuild a plain model from the config without it.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any model folder
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "config.json").exists():
                raise
    except Exception as exc:
        raise ModelLoadError(f"cannot convert {gguf_path} to safetensors: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
