"""Regenerate the Python stubs (messages, gRPC, type stubs) from protos/ into clients/pb/, and the REST sidecar's
OpenAPI document (deploy/rest/openapi.json, protos/openapi.py) when writing to the default place.

Usage: python protos/generate.py [--out DIR]   (`make protos` runs it; tests check the committed copies are fresh)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = ROOT.parent / "clients" / "pb"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "llmserve").rglob("*.proto"))


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{ROOT / 'third_party'}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *proto_files(),
    ]
    # The mypy plugins are console scripts beside this interpreter.
    os.environ["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    # protoc writes modules only; the packages need their __init__.py.
    for d in (p for p in (out / "llmserve").rglob("*") if p.is_dir()):
        if d.name != "__pycache__":
            (d / "__init__.py").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    generate(out)
    if out == DEFAULT_OUT:
        sys.path.insert(0, str(ROOT))
        import openapi

        openapi.write()


if __name__ == "__main__":
    main()
