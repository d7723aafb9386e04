"""dtype "auto": bfloat16 where the hardware computes it fast, float32 elsewhere; explicit dtypes pass through."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.worker.models import resolve_dtype


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_explicit_dtypes_are_kept(dtype):
    assert resolve_dtype(dtype, "cpu") == dtype


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_auto_on_cpu_is_bfloat16_exactly_when_the_cpu_has_amx():
    expected = "bfloat16" if "amx_tile" in _cpu_flags() else "float32"
    assert resolve_dtype("auto", "cpu") == expected
