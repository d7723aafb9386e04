"""Every Kubernetes overlay renders and validates against the Kubernetes schemas (kubernetes-validate), so a
manifest cannot rot; and what each overlay promises holds in the rendered output."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from deploy.k8s.render import build, merge

K8S = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
WORKLOADS = ("Deployment", "StatefulSet")


def _containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_there_are_a_cpu_and_a_gpu_overlay():
    assert OVERLAYS == ["cpu-dev", "gpu-prod"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_and_every_resource_validates(overlay):
    docs = build(K8S / "overlays" / overlay)
    version = kubernetes_validate.latest_version()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "llmserve"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert len(names) == len(docs), "two resources of one kind share a name"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_requests_limits_probes_and_a_disruption_budget(overlay):
    docs = build(K8S / "overlays" / overlay)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for doc in (d for d in docs if d["kind"] in WORKLOADS):
        name = doc["metadata"]["name"]
        for container in _containers(doc):
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (name, container["name"])
            assert "memory" in resources.get("limits", {}), (name, container["name"])
            assert "readinessProbe" in container, (name, container["name"])
        labels = doc["spec"]["template"]["metadata"]["labels"]
        if doc["spec"].get("replicas", 1) > 1 or name == "gateway":
            covering = [b for b in budgets if all(labels.get(k) == v
                                                  for k, v in b["spec"]["selector"]["matchLabels"].items())]
            assert len(covering) == 1, f"{overlay}: {name} has {len(covering)} disruption budgets"
            budget = covering[0]["spec"]
            if "minAvailable" in budget:  # a budget its replicas can meet, or no node could ever be drained
                assert budget["minAvailable"] < doc["spec"].get("replicas", 1), (overlay, name)
    # Workloads of one app (the worker pools) must not select each other's pods.
    selectors = [(d["metadata"]["name"], d["spec"]["selector"]["matchLabels"]) for d in docs if d["kind"] in WORKLOADS]
    for name, selector in selectors:
        for other in (d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] != name):
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert not all(labels.get(k) == v for k, v in selector.items()), (name, other["metadata"]["name"])


def _workloads(overlay: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in build(K8S / "overlays" / overlay) if d["kind"] in WORKLOADS}


def test_etcd_is_three_members_with_peer_and_client_certificate_auth():
    for overlay in OVERLAYS:
        etcd = _workloads(overlay)["etcd"]
        assert etcd["spec"]["replicas"] == 3
        command = _containers(etcd)[0]["command"]
        assert {"--client-cert-auth", "--peer-client-cert-auth"} <= set(command)
        (cluster,) = [a for a in command if a.startswith("--initial-cluster=")]
        assert cluster.count("https://") == 3


def test_gpu_prod_runs_tensorrt_workers_on_gpus_and_cpu_workers_beside_them():
    workloads = _workloads("gpu-prod")
    (gpu,) = _containers(workloads["worker"])
    assert gpu["image"].startswith("llmserve-trtllm:") and gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert workloads["worker"]["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    (cpu,) = _containers(workloads["worker-cpu"])
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    # Both pools are "worker" to the NetworkPolicies and the scheduler.
    assert workloads["worker-cpu"]["spec"]["template"]["metadata"]["labels"]["app"] == "worker"
    hpa = [d for d in build(K8S / "overlays" / "gpu-prod") if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa[0]["spec"]["minReplicas"] >= 3


def test_cpu_dev_has_no_gpu_anywhere():
    rendered = yaml.safe_dump_all(build(K8S / "overlays" / "cpu-dev"))
    assert "nvidia.com/gpu" not in rendered and "trtllm" not in rendered


def test_the_merge_follows_kustomize_for_the_cases_used():
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}],
                            "resources": {"limits": {"g": 1, "m": 2}}}],
            "tolerations": [{"key": "k1"}]}
    patched = merge(base, {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}],
                                           "resources": {"limits": {"g": None}}},
                                          {"name": "b"}],
                           "tolerations": [{"key": "k2"}]})
    assert [c["name"] for c in patched["containers"]] == ["b", "a"]  # what a patch adds comes first
    assert patched["containers"][1]["env"] == [{"name": "Y", "value": "2"}, {"name": "X", "value": "1"}]
    assert patched["containers"][1]["resources"]["limits"] == {"m": 2} and patched["tolerations"] == [{"key": "k2"}]
    assert merge([{"name": "a"}, {"name": "b"}], [{"name": "a", "$patch": "delete"}]) == [{"name": "b"}]


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl not installed: the Python rendering is checked alone")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_renders_the_same(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(out.stderr)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key)
    ours = sorted(build(K8S / "overlays" / overlay), key=key)
    assert [key(d) for d in theirs] == [key(d) for d in ours]
    assert theirs == ours
