"""Token counting at the gateway: from what the registry says about a version, with no worker code or cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from llmserve.admin.v1 import registry_pb2 as rpb
from llmserve.common.tokenizers import TOKENIZER_SOURCE_LABEL, load_version_tokenizer
from llmserve.gateway.tokens import TokenCounter
from tests.helpers.tiny_models import MINILM_SOURCE, SMOLLM2_SOURCE

EMBED = rpb.ModelVersion(version="e-v1", kind=rpb.MODEL_KIND_EMBED, weights_source=MINILM_SOURCE, context_length=256)

COUNT_WITHOUT_WORKER = textwrap.dedent(f"""
    import asyncio, json, sys
    import llmserve.gateway.app  # the whole gateway, as its process imports it
    from llmserve.admin.v1 import registry_pb2 as rpb
    from llmserve.gateway.tokens import TokenCounter

    async def main():
        counter = TokenCounter()
        gguf = rpb.ModelVersion(version="g-v1", kind=rpb.MODEL_KIND_GENERATE, weights_source={SMOLLM2_SOURCE!r})
        embed = rpb.ModelVersion(version="e-v1", kind=rpb.MODEL_KIND_EMBED, weights_source={MINILM_SOURCE!r})
        counter.warm([gguf, embed])
        prompt = await counter.count(gguf, texts=["Hello there"], wait=True)
        chat = await counter.count(gguf, messages=[("user", "Hello there")], wait=True)
        texts = await counter.count(embed, texts=["a cat", "a kitten"], wait=True)
        print(json.dumps({{"prompt": prompt.per_input, "exact": prompt.is_exact and chat.is_exact and texts.is_exact,
                          "chat": chat.per_input, "embed": texts.per_input,
                          "worker_modules": sorted(m for m in sys.modules if m.startswith("llmserve.worker"))}}))

    asyncio.run(main())
""")


def test_the_gateway_counts_tokens_without_the_worker_package_or_its_cache(tmp_path):
    # Run from an empty folder with a cache path that does not exist: nothing may depend on a worker's cache.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMSERVE_MODEL_CACHE": str(tmp_path / "no-cache")}
    done = subprocess.run([sys.executable, "-c", COUNT_WITHOUT_WORKER], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    counted = json.loads(done.stdout.strip().splitlines()[-1])
    assert counted["worker_modules"] == []
    assert counted["exact"]
    assert counted["prompt"] == [2]  # "Hello there" is two tokens in SmolLM2's vocabulary, read from the GGUF
    assert counted["chat"][0] > 2  # the chat template wraps the message
    assert counted["embed"] == [4, 4]  # [CLS] a cat [SEP]: encoders count their special tokens, as the worker does
    assert not (tmp_path / "no-cache").exists() and not (tmp_path / ".llmserve").exists()


def test_a_tokenizer_source_label_overrides_the_weights():
    version = rpb.ModelVersion(version="x-v1", kind=rpb.MODEL_KIND_EMBED, weights_source="file:/nonexistent/weights",
                               labels={TOKENIZER_SOURCE_LABEL: MINILM_SOURCE})
    assert load_version_tokenizer(version)("a cat")["input_ids"][0] == 101  # MiniLM's [CLS]


async def test_counting_waits_only_when_asked_and_estimates_without_a_tokenizer():
    counter = TokenCounter()
    assert await counter.count(EMBED, texts=["a cat"], wait=False) is None  # still loading: not counted ...
    await counter.tokenizer(EMBED)  # ... but loading has started
    assert counter.is_ready(EMBED)
    counted = await counter.count(EMBED, texts=["a cat"], wait=False)
    assert counted.per_input == (4,) and counted.is_exact and counted.total == 4
    missing = rpb.ModelVersion(version="m-v1", weights_source="file:/nonexistent/model")
    estimate = await counter.count(missing, texts=["abcd"], wait=True)
    assert not estimate.is_exact and estimate.per_input == (4 + 8,)  # an upper bound: bytes + 8


async def test_a_tokenizer_that_cannot_load_in_the_background_reports_no_unretrieved_error():
    """Seen in the fuzz mesh: versions registered with weights no gateway can read were warmed at start, their
    loading tasks failed and nobody awaited them ("Task exception was never retrieved", with a traceback, at exit)."""
    import asyncio
    import gc

    loop = asyncio.get_running_loop()
    unhandled = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        counter = TokenCounter()
        broken = rpb.ModelVersion(version="broken-v1", kind=rpb.MODEL_KIND_GENERATE, weights_source="file:/nonexistent")
        counter.warm([broken])
        await asyncio.wait(list(counter._loading.values()))
        del counter
        gc.collect()
        assert unhandled == []
        # Counting later still works: an estimate from bytes, as before.
        later = TokenCounter()
        later.warm([broken])
        assert not (await later.count(broken, texts=["Hello"], wait=True)).is_exact
    finally:
        loop.set_exception_handler(previous)
