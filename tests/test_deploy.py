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


def _k8s_config(tmp_path):
    configmap = yaml.safe_load((DEPLOY / "k8s" / "config.yaml").read_text())
    path = tmp_path / "llmserve.yaml"
    path.write_text(configmap["data"]["llmserve.yaml"])
    return load_config(path, env={})


def _redis_args(service: str) -> tuple[list[str], dict]:
    """(args of the Redis container behind a Service of redis.yaml, its workload)."""
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "redis.yaml").read_text()))
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == service]
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and d["spec"]["template"]["metadata"]["labels"] == svc["spec"]["selector"]]
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container["args"], workload


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_accounting_redis_never_evicts_and_persists_and_the_cache_is_another(tmp_path):
    from urllib.parse import urlparse
    config = _k8s_config(tmp_path)
    accounting, cache = urlparse(config.redis.url).hostname, urlparse(config.redis.cache_url).hostname
    assert accounting and cache and accounting != cache
    args, workload = _redis_args(accounting)
    assert _flag(args, "--maxmemory-policy") == "noeviction" and _flag(args, "--appendonly") == "yes"
    # The append-only file lives on a persistent volume, not in the container.
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in workload["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert workload["kind"] == "StatefulSet" and mounts.get(_flag(args, "--dir")) in claims
    cache_args, _ = _redis_args(cache)
    assert _flag(cache_args, "--maxmemory-policy") == "allkeys-lru" and _flag(cache_args, "--maxmemory")


def test_gateway_journal_is_on_a_volume(tmp_path):
    config = _k8s_config(tmp_path)
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "gateway.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (gateway,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    assert config.gateway.journal_dir in {m["mountPath"] for m in gateway["volumeMounts"]}


def test_local_config_separates_the_cache_from_accounting():
    config = load_config(DEPLOY / "local" / "llmserve.yaml", env={})
    assert config.redis.cache_url and config.redis.cache_url != config.redis.url


def test_mesh_members_share_the_mesh_token_from_one_secret():
    """The scheduler and workers refuse callers without the mesh token: every pod that calls or serves them gets it
    from the same Secret (never a literal in the manifests)."""
    refs = {}
    for name in ("gateway", "scheduler", "worker"):
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / f"{name}.yaml").read_text()):
            if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    if env["name"] == "LLMSERVE_SECURITY__MESH_TOKEN":
                        assert "value" not in env
                        refs[name] = env["valueFrom"]["secretKeyRef"]
    assert set(refs) == {"gateway", "scheduler", "worker"}
    assert len({(r["name"], r["key"]) for r in refs.values()}) == 1
