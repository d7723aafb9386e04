"""Renders a kustomization (the subset these manifests use) without the kustomize binary, which neither pip nor
Debian's archive installs here: `resources` (files, or folders with a kustomization.yaml), `patches` (strategic
merge patches naming their target by kind and metadata.name), `namespace` and `images`. The result is what
`kubectl kustomize` gives for these files: lists of containers, env, ports, volumes and volume mounts merge by
`name`
(new items first), other lists are replaced, a null deletes a key, `$patch: delete` in a list item removes that item.

    python deploy/k8s/render.py deploy/k8s/overlays/gpu-prod > gpu-prod.yaml   # kubectl apply -f gpu-prod.yaml
"""

from __future__ import annotations

import copy
import pathlib
import sys

import yaml

MERGE_KEYS = ("name", "containerPort", "mountPath")  # what identifies an item of a list that merges


def _merge_key(items: list) -> str | None:
    for key in MERGE_KEYS:
        if items and all(isinstance(i, dict) and key in i for i in items):
            return key
    return None


def merge(target, patch):
    """Strategic merge of `patch` into `target` (returns the result; target is changed in place when a dict)."""
    if isinstance(target, dict) and isinstance(patch, dict):
        for key, value in patch.items():
            if value is None:
                target.pop(key, None)
            elif key in target:
                target[key] = merge(target[key], value)
            else:
                target[key] = copy.deepcopy(value)
        return target
    if isinstance(target, list) and isinstance(patch, list):
        key = _merge_key(target + [p for p in patch if not (isinstance(p, dict) and p.get("$patch") == "delete")])
        if key is None:
            return copy.deepcopy(patch)
        merged, added = list(target), []
        for item in patch:
            found = next((i for i, t in enumerate(merged) if t.get(key) == item.get(key)), None)
            if item.get("$patch") == "delete":
                if found is not None:
                    merged.pop(found)
            elif found is None:
                added.append(copy.deepcopy(item))
            else:
                merged[found] = merge(merged[found], item)
        return added + merged  # as kustomize orders them: items the patch adds come first
    return copy.deepcopy(patch)


def _load(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def build(folder: str | pathlib.Path) -> list[dict]:
    folder = pathlib.Path(folder)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += build(path) if path.is_dir() else _load(path)
    for patch in kustomization.get("patches", []):
        for change in _load(folder / patch["path"]):
            matches = [d for d in docs if d["kind"] == change["kind"]
                       and d["metadata"]["name"] == change["metadata"]["name"]]
            if len(matches) != 1:
                raise ValueError(f"{folder / patch['path']}: {change['kind']} {change['metadata']['name']!r} "
                                 f"matches {len(matches)} resources")
            merge(matches[0], change)
    if namespace := kustomization.get("namespace"):
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for doc in docs:
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return docs


if __name__ == "__main__":
    sys.stdout.write(yaml.safe_dump_all(build(sys.argv[1]), sort_keys=False))
