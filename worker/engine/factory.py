"""make_engine: one registry version -> a loaded engine that implements the contract.

The table ENGINES maps a version's `engine` field and kind to a builder; the worker calls only make_engine.
Implementations are imported inside their builders, so a worker never imports an engine it does not run
(tensorrt_llm exists only on GPU machines).
"""

from __future__ import annotations

import pathlib
import typing

from llmserve.admin.v1 import registry_pb2
from llmserve.common.config import WorkerConfig

from .contract import EmbeddingEngine, GenerationEngine

Engine = GenerationEngine | EmbeddingEngine
Builder = typing.Callable[[registry_pb2.ModelVersion, WorkerConfig], Engine]


def _paged(version: registry_pb2.ModelVersion, cfg: WorkerConfig) -> Engine:
    from llmserve.worker.models import load_generation_model, resolve_dtype

    from .paged.engine import PagedEngine

    dtype = resolve_dtype(cfg.dtype, cfg.device)
    quantization = version.quantization or cfg.quantization  # the version's own, else the worker's default
    if quantization == "int8" and dtype == "float32":
        dtype = "bfloat16"  # int8 weights take bf16 activations (fp32 ones are 26x slower in aten's kernel)
    model, tokenizer = load_generation_model(version.weights_source, pathlib.Path(cfg.model_cache_dir),
                                             device=cfg.device, dtype=dtype)
    return PagedEngine(model, tokenizer, max_num_seqs=cfg.max_num_seqs, block_size=cfg.block_size,
                       num_kv_blocks=cfg.num_kv_blocks or None, kv_cache_fraction=cfg.kv_cache_fraction,
                       max_num_batched_tokens=cfg.max_num_batched_tokens,
                       enable_prefix_caching=cfg.enable_prefix_caching, quantization=quantization,
                       max_adapters=cfg.max_adapters, max_lora_rank=cfg.max_lora_rank)


def _embedding(version: registry_pb2.ModelVersion, cfg: WorkerConfig) -> Engine:
    from llmserve.worker.models import load_embedding_model

    from .embedding import TorchEmbeddingEngine

    model, tokenizer = load_embedding_model(version.weights_source, device=cfg.device)
    return TorchEmbeddingEngine(model, tokenizer, max_num_seqs=version.max_batch_size or 32,
                                max_wait_ms=version.max_wait_ms or 5, context_length=version.context_length or None)


def _tensorrt_llm(version: registry_pb2.ModelVersion, cfg: WorkerConfig) -> Engine:
    from llmserve.common.sources import resolve_source

    from .trtllm import TensorRTLLMEngine

    return TensorRTLLMEngine.from_pretrained(version.version, str(resolve_source(version.weights_source)),
                                             max_num_seqs=cfg.max_num_seqs, context_length=version.context_length)


# (engine name, kind) -> builder; "" and "torch" name the PyTorch engines.
ENGINES: dict[tuple[str, int], Builder] = {
    ("torch", registry_pb2.MODEL_KIND_GENERATE): _paged,
    ("torch", registry_pb2.MODEL_KIND_EMBED): _embedding,
    ("tensorrt_llm", registry_pb2.MODEL_KIND_GENERATE): _tensorrt_llm,
}


def _kind_name(kind: int) -> str:
    return registry_pb2.ModelKind.Name(typing.cast(registry_pb2.ModelKind.ValueType, kind))


def make_engine(version: registry_pb2.ModelVersion, config: WorkerConfig) -> Engine:
    """Loads the version's weights into its engine (blocking: run it in a thread). Raises ValueError for an
    engine/kind pair that does not exist."""
    key = (version.engine or "torch", version.kind)
    builder = ENGINES.get(key)
    if builder is None:
        known = ", ".join(f"{e}/{_kind_name(k)}" for e, k in ENGINES)
        raise ValueError(f"model version {version.version!r}: no engine {key[0]!r} for "
                         f"{_kind_name(version.kind)} (known: {known})")
    return builder(version, config)
