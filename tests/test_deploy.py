"""Deployment files stay true to the code: configs load, alerts and dashboards use metrics that exist."""

from __future__ import annotations

import json
import pathlib
import re

import yaml

from llmserve.common.config import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def defined_metrics() -> set[str]:
    names = set()
    for path in REPO.glob("*/metrics.py"):
        for kind, name in re.findall(r'(Counter|Gauge|Histogram)\("([a-z_]+)"', path.read_text()):
            suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}[kind]
            names.update(name + s for s in suffixes)
    return names


def test_configs_load(tmp_path):
    load_config(DEPLOY / "local" / "llmserve.yaml", env={})
    configmap = yaml.safe_load((DEPLOY / "k8s" / "config.yaml").read_text())
    path = tmp_path / "llmserve.yaml"
    path.write_text(configmap["data"]["llmserve.yaml"])
    config = load_config(path, env={})
    assert config.worker.device == "cuda" and config.gateway.host == "0.0.0.0"


def test_manifests_parse_and_run_real_services():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    services = set()
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            assert doc["apiVersion"] and doc["kind"]
            if doc["kind"] == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    if container["image"] == "llmserve" and "args" in container:
                        services.add(container["args"][0])
    assert services == {"llmserve.gateway", "llmserve.scheduler", "llmserve.worker", "llmserve.registry"}


def test_alerts_and_dashboard_use_existing_metrics():
    known = defined_metrics()
    rules = yaml.safe_load((DEPLOY / "monitoring" / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "monitoring" / "dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"llmserve_[a-z_]+", e)}
    assert used and used <= known, f"unknown metrics: {sorted(used - known)}"
