"""Streaming text must be exactly the text of a full decode, whatever the token or chunk boundaries."""

from __future__ import annotations

import random

import pytest

from llmserve.worker.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from tests.helpers.tiny_models import smollm2_tokenizer

MULTILINGUAL = "Hello 世界! Emoji: 🎉🚀👍🏽 naïve café — 日本語, Ελληνικά, русский. Done."


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detokenizer.add(token_id) for token_id in token_ids] + [detokenizer.flush()]


def test_multibyte_text_streams_identically_to_a_full_decode(tokenizer):
    prompt = tokenizer.encode("Translate:")
    ids = tokenizer.encode(MULTILINGUAL)
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), ids)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTILINGUAL
    # Byte-level BPE splits emoji across tokens: those halves must be held back, never emitted as U+FFFD.
    assert "" in deltas[:-1]
    assert not any("\ufffd" in delta for delta in deltas)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Paris.") + [tokenizer.eos_token_id]
    assert "".join(stream(IncrementalDetokenizer(tokenizer, []), ids)) == "Paris."


def test_invalid_utf8_at_the_end_is_flushed_like_a_full_decode(tokenizer):
    emoji = tokenizer.encode("🎉")
    assert len(emoji) > 1, "the test needs an emoji split across tokens"
    ids = tokenizer.encode("party ") + emoji[:-1]  # stream ends in the middle of a character
    deltas = stream(IncrementalDetokenizer(tokenizer, []), ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1].endswith("\ufffd")


def feed_in_chunks(matcher: StopMatcher, text: str, chunk_sizes: list[int]) -> tuple[str, bool]:
    emitted, position = [], 0
    for size in chunk_sizes:
        piece, stopped = matcher.feed(text[position : position + size])
        emitted.append(piece)
        position += size
        if stopped:
            return "".join(emitted), True
    return "".join(emitted) + matcher.flush(), False


@pytest.mark.parametrize("seed", range(20))
def test_stop_string_cuts_text_at_any_chunking(seed):
    rng = random.Random(seed)
    text = "The answer is: forty-two. END of story, END again"
    sizes = [rng.randint(1, 4) for _ in range(len(text))]
    emitted, stopped = feed_in_chunks(StopMatcher(["END", "never"]), text, sizes)
    assert (emitted, stopped) == ("The answer is: forty-two. ", True)


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)


def test_partial_stop_prefix_is_released_when_it_diverges():
    matcher = StopMatcher(["stop"])
    assert matcher.feed("a sto") == ("a ", False)  # "sto" might become "stop"
    assert matcher.feed("ry") == ("story", False)
    assert matcher.feed(" st") == (" ", False)
    assert matcher.flush() == "st"


def test_no_stop_strings_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""
