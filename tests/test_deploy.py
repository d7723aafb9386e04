"""Deployment files stay true to the code: configs load, alerts and dashboards use metrics that exist."""

from __future__ import annotations

import json
import pathlib
import re

import yaml

from llmserve.common.config import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s" / "base"  # the overlays (tests/test_k8s_overlays.py) build on it


def defined_metrics() -> set[str]:
    names = set()
    for path in REPO.glob("*/metrics.py"):
        for kind, name in re.findall(r'(Counter|Gauge|Histogram)\("([a-z_]+)"', path.read_text()):
            suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}[kind]
            names.update(name + s for s in suffixes)
    return names


def test_configs_load(tmp_path):
    load_config(DEPLOY / "local" / "llmserve.yaml", env={})
    configmap = yaml.safe_load((K8S / "config.yaml").read_text())
    path = tmp_path / "llmserve.yaml"
    path.write_text(configmap["data"]["llmserve.yaml"])
    config = load_config(path, env={})
    assert config.worker.device == "cuda" and config.gateway.host == "0.0.0.0"


def test_manifests_parse_and_run_real_services():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    services = set()
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
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
    configmap = yaml.safe_load((K8S / "config.yaml").read_text())
    path = tmp_path / "llmserve.yaml"
    path.write_text(configmap["data"]["llmserve.yaml"])
    return load_config(path, env={})


def _redis_args(service: str) -> tuple[list[str], dict]:
    """(args of the Redis container behind a Service of redis.yaml, its workload)."""
    docs = list(yaml.safe_load_all((K8S / "redis.yaml").read_text()))
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
    docs = list(yaml.safe_load_all((K8S / "gateway.yaml").read_text()))
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
        for doc in yaml.safe_load_all((K8S / f"{name}.yaml").read_text()):
            if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    if env["name"] == "LLMSERVE_SECURITY__MESH_TOKEN":
                        assert "value" not in env
                        refs[name] = env["valueFrom"]["secretKeyRef"]
    assert set(refs) == {"gateway", "scheduler", "worker"}
    assert len({(r["name"], r["key"]) for r in refs.values()}) == 1


# ---- an authenticated, encrypted mesh (issue 9): NetworkPolicies, mTLS, etcd authentication ----

def _k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _workloads() -> dict[str, dict]:
    """Every Deployment and StatefulSet by name."""
    return {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")}


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions In / NotIn / Exists) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


OUTSIDE = {"namespace": "elsewhere", "labels": {"app": "anything"}}  # a pod of another namespace


def _may_connect(source: dict, target_labels: dict, port: int) -> bool:
    """Whether the namespace's NetworkPolicies let `source` ({namespace, labels}) reach a pod with target_labels on
    TCP `port`. Ingress only: a pod no policy selects accepts everything; else some rule of a selecting policy
    must allow the source and the port."""
    policies = [d for d in _k8s_docs() if d["kind"] == "NetworkPolicy"
                and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
                and _selects(d["spec"]["podSelector"], target_labels)]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                in_namespace = source["namespace"] == "llmserve"
                if "namespaceSelector" in peer:
                    ns_labels = {"kubernetes.io/metadata.name": source["namespace"]}
                    if not _selects(peer["namespaceSelector"], ns_labels):
                        continue
                    if "podSelector" not in peer or _selects(peer["podSelector"], source["labels"]):
                        return True
                elif in_namespace and _selects(peer.get("podSelector", {}), source["labels"]):
                    return True
    return False


def _who_reaches(target: str, port: int) -> set[str]:
    workloads = _workloads()
    labels = workloads[target]["spec"]["template"]["metadata"]["labels"]
    sources = {name: {"namespace": "llmserve", "labels": w["spec"]["template"]["metadata"]["labels"]}
               for name, w in workloads.items()}
    sources["outside"] = OUTSIDE
    sources["stray-pod"] = {"namespace": "llmserve", "labels": {"app": "debug-shell"}}
    return {name for name, source in sources.items() if _may_connect(source, labels, port)}


def test_network_policies_deny_by_default_and_allow_only_the_mesh_paths():
    docs = _k8s_docs()
    (deny,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
    mesh = {"gateway", "scheduler", "worker", "registry"}
    assert _who_reaches("scheduler", 50052) == {"gateway"}  # only gateways submit work
    assert _who_reaches("worker", 50061) == {"scheduler"}  # only the scheduler dispatches
    assert _who_reaches("etcd", 2379) == mesh
    assert _who_reaches("redis", 6379) == {"gateway", "registry"}  # accounting
    assert _who_reaches("redis-cache", 6379) == {"gateway"}
    assert _who_reaches("registry", 50053) == set()  # operators come through `kubectl port-forward`
    everyone = {*_workloads(), "outside", "stray-pod"}
    assert _who_reaches("gateway", 50051) == _who_reaches("gateway", 8080) == everyone  # the public edge
    for name in ("scheduler", "worker", "etcd", "redis"):
        assert _who_reaches(name, 9999) == set(), name  # no other port is open
    # The ports the policies name are the ones the containers listen on.
    workloads = _workloads()
    listening = {name: {p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
                 for name, w in workloads.items()}
    assert 50052 in listening["scheduler"] and 50061 in listening["worker"] and 2379 in listening["etcd"]


def test_every_mesh_service_runs_mtls_with_its_own_certificate(tmp_path):
    config = _k8s_config(tmp_path)
    assert config.security.tls == "on" and config.security.tls_check_roles
    files = {config.security.tls_cert, config.security.tls_key, config.security.tls_ca}
    workloads = _workloads()
    secrets = {}
    for name in ("gateway", "scheduler", "worker", "registry"):
        spec = workloads[name]["spec"]["template"]["spec"]
        (container,) = [c for c in spec["containers"] if c["name"] == name]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        tls_mounts = [(path, v) for path, v in mounted.items() if all(f.startswith(path + "/") for f in files)]
        assert len(tls_mounts) == 1, f"{name}: the TLS files are not on one mounted volume"
        secrets[name] = tls_mounts[0][1]["secret"]["secretName"]
        # kubelet's gRPC probe cannot speak TLS: probes run `llmserve health` in the container.
        for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
            if probe in container:
                assert "grpc" not in container[probe] and "health" in container[probe]["exec"]["command"]
    assert len(set(secrets.values())) == 4  # one certificate (and role) per service
    # The REST sidecar serves HTTPS and dials the gateway over TLS.
    (rest,) = [c for c in workloads["gateway"]["spec"]["template"]["spec"]["containers"] if c["name"] == "rest"]
    assert {"--tls-cert", "--tls-key", "--gateway-ca"} <= set(rest["command"])
    assert rest["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_etcd_requires_client_certificates_and_the_services_present_theirs(tmp_path):
    (etcd,) = _workloads()["etcd"]["spec"]["template"]["spec"]["containers"]
    command = etcd["command"]
    assert "--client-cert-auth" in command and any(a.startswith("--trusted-ca-file=") for a in command)
    assert all(a.split("=", 1)[1].startswith("https://") for a in command
               if a.startswith(("--listen-client-urls=", "--advertise-client-urls=")))
    config = _k8s_config(tmp_path)
    assert config.etcd.ca_file and config.etcd.cert_file and config.etcd.key_file
