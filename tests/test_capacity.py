"""deploy/CAPACITY.md holds exactly what deploy/capacity.py computes from deploy/capacity-inputs.json, and the
model's arithmetic holds on its own."""

from __future__ import annotations

import copy
import json

import pytest

from deploy import capacity


def _inputs() -> dict:
    return json.loads(capacity.INPUTS.read_text())


def test_the_document_holds_the_scripts_numbers():
    document = capacity.DOCUMENT.read_text()
    section = capacity.Model(_inputs()).render()
    assert document.count(capacity.BEGIN) == 1 and document.count(capacity.END) == 1
    assert section in document, "deploy/CAPACITY.md is stale: run `python deploy/capacity.py --write`"


def test_every_worker_figure_is_cited_and_every_measured_figure_is_there():
    inputs = _inputs()
    for worker in inputs["workers"]:
        assert worker["ref"] in inputs["references"]
    for tier in ("gateway", "scheduler", "redis"):
        assert inputs["measured"][tier], f"no measured {tier} figures: python deploy/capacity.py --measured ..."
    assert "https://" in inputs["references"]["TRT-LLM perf overview"]


def test_the_model_scales_as_stated():
    model = capacity.Model(_inputs())
    # Gateways grow linearly with the rate; more cache hits cost less gateway CPU than misses when hits are
    # cheaper, and always fewer scheduler tasks and GPUs.
    assert abs(model.gateway_cores(200_000, 0.3) - 2 * model.gateway_cores(100_000, 0.3)) < 1e-6
    assert model.scheduler_cores(100_000, 0.4) < model.scheduler_cores(100_000, 0.0)
    tokens = _inputs()["workers"][0]["mixes"][0]["tokens_per_s"]
    assert model.gpus(100_000, 0.4, 128, tokens) == pytest.approx(0.6 * model.gpus(100_000, 0.0, 128, tokens))
    # Twice the planned utilization halves every replica count.
    busier = copy.deepcopy(_inputs())
    busier["assumptions"]["target_utilization"] *= 2
    assert abs(capacity.Model(busier).gateway_cores(1e5, 0.3) * 2 - model.gateway_cores(1e5, 0.3)) < 1e-6
