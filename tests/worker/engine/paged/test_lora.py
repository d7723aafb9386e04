"""LoRA adapters in PEFT's format on the paged engine: equal to Hugging Face + PEFT token for token, mixed with the
base model and with each other in one batch, loaded on demand under an LRU cap, and refused with a reason when they
cannot apply. Adapters are built by PEFT itself from the tiny random Llama, with non-zero weights."""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest
import torch

from llmserve.worker.engine.contract import GenerationRequest, SamplingParams
from llmserve.worker.engine.paged import lora
from llmserve.worker.engine.paged.engine import PagedEngine

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog and then", "1 2 3 4"]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(model_dir: pathlib.Path, out: pathlib.Path, seed: int, r: int = 4, modules=ALL_MODULES,
                  **extra) -> pathlib.Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved by PEFT's save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules,
                                                  init_lora_weights=False, lora_dropout=0.0, **extra))
    with torch.no_grad():  # scale B up so that the adapter visibly changes a random model's greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(8.0)
    peft_model.save_pretrained(out)
    return out


def hf_peft_greedy(model_dir: pathlib.Path, adapter_dir: pathlib.Path | None, prompt_ids: list[int],
                   max_tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"a": build_adapter(tiny_llama_dir, root / "a", seed=1),
            "b": build_adapter(tiny_llama_dir, root / "b", seed=2, r=8, modules=["q_proj", "v_proj", "down_proj"])}


@pytest.fixture
async def engine(tiny_llama, adapters):
    engine = PagedEngine(*tiny_llama, max_num_seqs=8, num_kv_blocks=256, block_size=4, max_adapters=2)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    engine.start()
    yield engine
    await engine.stop()


async def generate(engine, prompt: str, adapter: str = "", max_tokens: int = 12, request_id: str = "r"):
    request = GenerationRequest(request_id, engine.encode(prompt),
                                SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                                adapter=adapter)
    outputs = [o async for o in engine.generate(request)]
    return outputs


async def test_adapter_output_equals_hf_with_peft_token_for_token(engine, tiny_llama_dir, adapters):
    for name in ("a", "b"):
        prompt = PROMPTS[1]
        expected = hf_peft_greedy(tiny_llama_dir, adapters[name], engine.encode(prompt), 12)
        base = hf_peft_greedy(tiny_llama_dir, None, engine.encode(prompt), 12)
        assert expected != base  # the adapter changes the output: the comparison below can fail
        outputs = await generate(engine, prompt, adapter=name)
        assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 12
        assert "".join(o.text_delta for o in outputs) == engine.tokenizer.decode(expected)


async def test_base_and_adapter_rows_in_one_batch_each_equal_their_solo_output(engine):
    solo = {(p, a): "".join(o.text_delta for o in await generate(engine, p, a)) for p in PROMPTS
            for a in ("", "a", "b")}
    jobs = [(p, a) for p in PROMPTS for a in ("", "a", "b")]
    steps_before = engine.num_steps
    results = await asyncio.gather(*(generate(engine, p, a, request_id=f"r{i}") for i, (p, a) in enumerate(jobs)))
    # 9 sequences of 12 tokens shared steps (8 at a time), so rows of different adapters sat in one batch.
    assert engine.num_steps - steps_before < 9 * 12 / 2
    for (p, a), outputs in zip(jobs, results, strict=True):
        assert "".join(o.text_delta for o in outputs) == solo[(p, a)], (p, a)


async def test_adapters_load_on_demand_under_the_lru_cap_and_never_share_cached_blocks(engine, adapters,
                                                                                     tmp_path, tiny_llama_dir):
    assert engine.resident_adapters == []  # nothing loads before it is used
    await generate(engine, PROMPTS[0], "a")
    await generate(engine, PROMPTS[0], "b")
    assert engine.resident_adapters == ["a", "b"] and engine.num_adapter_loads == 2
    engine.add_adapter("c", build_adapter(tiny_llama_dir, tmp_path / "c", seed=3))
    await generate(engine, PROMPTS[0], "c")  # the cap is 2: "a", least recently used, makes room
    assert engine.resident_adapters == ["b", "c"]
    again = await generate(engine, PROMPTS[0], "a")  # waits for its load again; not refused
    assert again[-1].finish_reason == "length" and engine.num_adapter_loads == 4
    # Same prompt, same tenant, different adapters: no prefix-cache hit across them (their K/V differ).
    long_prompt = " ".join(["alpha beta gamma delta"] * 6)
    first = await generate(engine, long_prompt, "a", max_tokens=1)
    other = await generate(engine, long_prompt, "b", max_tokens=1)
    same = await generate(engine, long_prompt, "a", max_tokens=1)
    assert other[-1].cached_tokens == 0 and same[-1].cached_tokens > 0 and first[-1].cached_tokens == 0


async def test_an_adapter_removed_while_running_finishes_its_requests(engine):
    running = asyncio.create_task(generate(engine, PROMPTS[1], "a", max_tokens=40))
    await asyncio.sleep(0.05)
    engine.remove_adapter("a")
    outputs = await running
    assert outputs[-1].finish_reason == "length" and "a" not in engine.resident_adapters
    refused = await generate(engine, PROMPTS[1], "a")
    assert refused[-1].finish_reason == "error" and "not served" in refused[-1].error


@pytest.mark.parametrize("change, message", [
    (dict(r=128), "rank r=128 is over this engine's cap of 64"),
    (dict(use_dora=True), "DoRA is not supported"),
    (dict(bias="all"), "bias='all' is not supported"),
])
def test_adapters_that_cannot_apply_are_refused_with_the_reason(tiny_llama, adapters, tmp_path, change, message):
    model, _ = tiny_llama
    folder = tmp_path / "x"
    folder.mkdir()
    settings = json.loads((adapters["a"] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **change}))
    (folder / "adapter_model.safetensors").write_bytes((adapters["a"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(lora.AdapterError, match=message.replace("(", r"\(")):
        lora.load_adapter("x", folder, model.config, dtype=torch.float32, device=torch.device("cpu"), max_rank=64)
    with pytest.raises(lora.AdapterError, match="must hold adapter_config.json"):
        lora.load_adapter("y", tmp_path, model.config, dtype=torch.float32, device=torch.device("cpu"), max_rank=64)
