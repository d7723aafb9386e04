"""ModelRunner over packed (pre-transposed, fused) weights: HF's logits, HF's own modules still working, no copies."""

from __future__ import annotations

import pytest
import torch

from llmserve.worker.engine.paged.model_runner import ModelRunner
from llmserve.worker.engine.paged.sequence import Sequence
from llmserve.worker.engine.paged.step_scheduler import ScheduledBatch
from llmserve.worker.engine.paged.weights import pack_weights
from llmserve.worker.models import load_generation_model

BLOCK_SIZE = 4


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0]  # [T, vocab]


def sequences(lengths: list[int], vocab: int, seed: int = 0) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    seqs, block = [], 0
    for n in lengths:
        seq = Sequence(torch.randint(0, vocab, (n,), generator=gen).tolist())
        num_blocks = -(-n // BLOCK_SIZE)
        seq.block_table = list(range(block, block + num_blocks))
        block += num_blocks
        seqs.append(seq)
    return seqs


def run_prompt_then_decode(runner: ModelRunner, seqs: list[Sequence]) -> list[torch.Tensor]:
    """Prefill every sequence but its last token in one step, then decode the last tokens in one step."""
    batch = ScheduledBatch(seqs, [s.num_tokens - 1 for s in seqs])
    runner.execute(batch)
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    rows, logits = runner.execute(ScheduledBatch(seqs, [1] * len(seqs)))
    return [logits[rows.index(i)] for i in range(len(seqs))]


@pytest.fixture(scope="module")
def tiny_copy(tiny_llama_dir, tmp_path_factory):
    """A private copy of the tiny Llama: packing re-lays out the model's weights."""
    return load_generation_model(str(tiny_llama_dir), tmp_path_factory.mktemp("cache"))


def test_packed_runner_matches_hf_logits_for_prefill_and_decode(tiny_copy):
    model, _ = tiny_copy
    runner = ModelRunner(model, num_blocks=64, block_size=BLOCK_SIZE)
    seqs = sequences([3, 9, 17, 30], model.config.vocab_size)
    got = run_prompt_then_decode(runner, seqs)
    for seq, logits in zip(seqs, got):
        expected = hf_logits(model, seq.token_ids)[-1]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert logits.argmax() == expected.argmax()


def test_packing_replaces_the_weights_in_place_and_is_idempotent(tiny_llama_dir, tmp_path_factory):
    model, _ = load_generation_model(str(tiny_llama_dir), tmp_path_factory.mktemp("cache"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = hf_logits(model, [1, 2, 3, 4, 5])
    packed = pack_weights(model)
    assert pack_weights(model) is packed
    layer, attn = packed.layers[0], model.model.layers[0].self_attn
    # HF's modules now hold views into the packed tensors, with their old shapes and values: nothing duplicated.
    assert attn.q_proj.weight.untyped_storage().data_ptr() == layer.qkv_t.untyped_storage().data_ptr()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.untyped_storage().data_ptr() == packed.lm_head_t.untyped_storage().data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    torch.testing.assert_close(hf_logits(model, [1, 2, 3, 4, 5]), reference, rtol=1e-5, atol=1e-5)
    assert packed.lm_head_t.is_contiguous() and layer.qkv_t.is_contiguous() and layer.gate_up_t.is_contiguous()


def test_bfloat16_runner_stays_close_to_hf_bfloat16(tiny_llama_dir, tmp_path_factory):
    model, _ = load_generation_model(str(tiny_llama_dir), tmp_path_factory.mktemp("cache"), dtype="bfloat16")
    runner = ModelRunner(model, num_blocks=64, block_size=BLOCK_SIZE)
    seqs = sequences([5, 12], model.config.vocab_size, seed=1)
    for seq, logits in zip(seqs, run_prompt_then_decode(runner, seqs)):
        expected = hf_logits(model, seq.token_ids)[-1]
        assert logits.dtype == torch.float32  # half-precision models compute their logits in fp32
        assert (logits.float() - expected.float()).abs().mean() < 0.05


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_row_bucket_gives_the_same_logits_whichever_kernel_it_picked(tiny_llama_dir, tmp_path_factory, dtype):
    """The runner's per-bucket kernel choice (MKL or oneDNN, measured at start) must not change the numbers: forcing
    each kernel for every bucket gives logits within the dtype's rounding of each other and of HF's."""
    model, _ = load_generation_model(str(tiny_llama_dir), tmp_path_factory.mktemp("cache"), dtype=dtype)
    runner = ModelRunner(model, num_blocks=256, block_size=BLOCK_SIZE)
    seqs = sequences([4, 7, 9, 33], model.config.vocab_size, seed=2)
    kernels = list(runner.matmul.kernels)
    assert len(kernels) >= 1 and set(runner.matmul.choice) <= set(kernels)
    results = []
    for forced in ("mkl", kernels[-1]):
        runner.matmul.choice = [forced] * len(runner.matmul.choice)
        for s in seqs:
            s.num_computed_tokens = 0
        results.append(run_prompt_then_decode(runner, seqs))
    tolerance = 1e-4 if dtype == "float32" else 0.05
    for mkl, onednn, seq in zip(*results, seqs):
        expected = hf_logits(model, seq.token_ids)[-1].float()
        assert (mkl.float() - onednn.float()).abs().mean() < tolerance
        assert (mkl.float() - expected).abs().mean() < tolerance


def test_int8_weights_stay_close_to_the_bf16_logits(tiny_llama_dir, tmp_path_factory):
    model, _ = load_generation_model(str(tiny_llama_dir), tmp_path_factory.mktemp("cache"), dtype="bfloat16")
    runner = ModelRunner(model, num_blocks=64, block_size=BLOCK_SIZE, quantization="int8")
    runner.matmul.choice = ["int8"] * len(runner.matmul.choice)  # every row count through the int8 kernel
    seqs = sequences([6, 11], model.config.vocab_size, seed=3)
    for seq, logits in zip(seqs, run_prompt_then_decode(runner, seqs)):
        expected = hf_logits(model, seq.token_ids)[-1].float()
        error = (logits.float() - expected).abs().mean() / expected.abs().mean()
        assert error < 0.05, error


def test_int8_needs_half_precision_activations(tiny_llama_dir, tmp_path_factory):
    model, _ = load_generation_model(str(tiny_llama_dir), tmp_path_factory.mktemp("cache"))
    with pytest.raises(ValueError, match="bf16"):
        ModelRunner(model, num_blocks=8, block_size=BLOCK_SIZE, quantization="int8")


def test_prompt_logprobs_are_hf_log_softmax_of_the_next_token(tiny_copy):
    model, _ = tiny_copy
    runner = ModelRunner(model, num_blocks=64, block_size=BLOCK_SIZE)
    (seq,) = sequences([21], model.config.vocab_size, seed=3)
    got = runner.prompt_logprobs(seq.token_ids, list(range(6)))
    expected = torch.log_softmax(hf_logits(model, seq.token_ids)[:-1], dim=-1)
    expected = expected.gather(1, torch.tensor(seq.token_ids[1:])[:, None])[:, 0]
    assert got.shape == (20,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
