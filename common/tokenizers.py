"""Tokenizers of model versions, loaded from what the registry says about the version (no service's cache).

A version's tokenizer comes from its `tokenizer_source` label when set (any weights source string: a folder with
tokenizer.json, or a .gguf file), else from its weights_source. A folder loads in well under a second; a .gguf
file is read directly through transformers' gguf_file (the vocabulary and chat template live in its metadata),
which takes seconds for SmolLM2, so services load tokenizers in the background.
"""

from __future__ import annotations

import threading

from llmserve.admin.v1 import registry_pb2
from llmserve.common.sources import ModelLoadError, resolve_source

TOKENIZER_SOURCE_LABEL = "tokenizer_source"

# transformers imports its classes lazily, and two threads importing at once can see a half-initialised module
# ("cannot import name 'AutoTokenizer'"): loads run one at a time.
_load_lock = threading.Lock()


def tokenizer_source(version: registry_pb2.ModelVersion) -> str:
    """The source string of the version's tokenizer: its tokenizer_source label, else its weights."""
    return version.labels.get(TOKENIZER_SOURCE_LABEL) or version.weights_source


def load_tokenizer(source: str):
    """A transformers tokenizer (with its chat template) from a weights source string, or ModelLoadError."""
    path = resolve_source(source)
    try:
        with _load_lock:
            from transformers import AutoTokenizer  # seconds to import: only callers that load a tokenizer pay

            if path.is_file() and path.suffix == ".gguf":
                return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types; callers need one
        raise ModelLoadError(f"cannot load a tokenizer from {source!r} ({path}): {exc}") from exc


def load_version_tokenizer(version: registry_pb2.ModelVersion):
    """The tokenizer of a registered model version."""
    return load_tokenizer(tokenizer_source(version))


# How a prompt becomes token ids, written once: the engines that run it and the gateway that counts it for limits
# must agree to the token.

def prompt_ids(tokenizer, text: str) -> list[int]:
    """A raw completion prompt, as is (no special tokens added)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_message(role: str, content: str, name: str = "") -> dict[str, str]:
    """One message as the chat template reads it (a name only when given, as OpenAI's optional field)."""
    return {"role": role, "content": content, "name": name} if name else {"role": role, "content": content}


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, tools: list[dict] | None = None) -> list[int]:
    """A conversation in the model's chat template: ready for the assistant's turn (add_generation_prompt), or
    ending inside the final (assistant) message, which the model continues (continue_final_message). tools: for a
    template that renders them (common/tools.py prepares the messages and decides)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message, tools=tools,
                                              tokenize=True, return_dict=False))
