#!/usr/bin/env python3
"""Validate the manifests of infra/k8s offline: `python infra/k8s/validate.py [FILE.yaml ...]`.

Every YAML document gets a schema, or fails:
- Kubernetes' own kinds: kubernetes-validate's strict schemas for KUBERNETES_VERSION (unknown fields rejected);
- ray.io/v1 kinds: the vendored KubeRay CRDs (schemas/, see schemas/README.md) turned into strict JSON Schema:
  additionalProperties false wherever properties are declared (unless x-kubernetes-preserve-unknown-fields),
  int-or-string fields as integer-or-string, nullable as a null type, metadata as Kubernetes' strict ObjectMeta.
  CEL rules (x-kubernetes-validations) are not evaluated; none applies to a field these manifests set.
Then the rules only the KubeRay operator enforces, at reconcile time (operator_rule_errors).
Needs pyyaml, jsonschema and kubernetes-validate (the project's dev environment).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
KUBERNETES_VERSION = "1.33"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CRD_GROUP_VERSION = "ray.io/v1"
OBJECT_META = (
    "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
)
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47  # KubeRay's MaxRayClusterNameLength, MaxRayJobNameLength
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")


class ManifestError(Exception):
    pass


# --- CRD -> strict JSON Schema ---------------------------------------------------------------------------------


def strict_schema(node: Any) -> Any:
    """An OpenAPI v3 schema of a CRD as JSON Schema that rejects undeclared fields."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = strict_schema(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_json_schema(kind: str) -> dict[str, Any]:
    crd = yaml.load((SCHEMAS / CRDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, CRDS[kind]
    group = crd["spec"]["group"]
    (version,) = [v for v in crd["spec"]["versions"] if f"{group}/{v['name']}" == CRD_GROUP_VERSION]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": CRD_GROUP_VERSION}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


@functools.cache
def _registry() -> Registry:
    defs = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs = defs / f"v{KUBERNETES_VERSION}.0-local-strict" / "_definitions.json"
    return Resource.from_contents(json.loads(defs.read_text())) @ Registry()


def schema_errors(doc: Any) -> list[str]:
    """Why `doc` fails its schema ([] when it passes). A document of a kind with no schema fails."""
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("apiVersion"), str)
        or not isinstance(doc.get("kind"), str)
    ):
        return ["not a Kubernetes object (apiVersion and kind)"]
    api, kind = doc["apiVersion"], doc["kind"]
    if api.split("/")[0] == CRD_GROUP_VERSION.split("/")[0]:
        if api != CRD_GROUP_VERSION or kind not in CRDS:
            return [f"no schema for {api} {kind} (vendored: {CRD_GROUP_VERSION} {', '.join(CRDS)})"]
        validator = jsonschema.Draft202012Validator(crd_json_schema(kind), registry=_registry())
        return [
            f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema for {api} {kind}: {e.message}"]
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"]
    return []


# --- rules the operator enforces (KubeRay v1.7.0 ray-operator/controllers/ray/utils/validation.go) ---------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _ray_cluster_spec_errors(spec: dict[str, Any], where: str) -> list[str]:
    errs = []
    auto = bool(spec.get("enableInTreeAutoscaling"))
    for key in ("num-cpus", "num-gpus", "memory", "resources"):
        if spec["headGroupSpec"].get("rayStartParams", {}).get(key) and spec["headGroupSpec"].get(
            "resources"
        ):
            errs.append(f"{where}: head sets resources in both rayStartParams and resources")
    for group in spec.get("workerGroupSpecs", []):
        name = f"{where}: worker group {group.get('groupName')}"
        lo, n, hi = group.get("minReplicas"), group.get("replicas"), group.get("maxReplicas")
        if not auto and (lo is None or hi is None):
            errs.append(f"{name} needs minReplicas and maxReplicas without autoscaling")
        if any(v is not None and v < 0 for v in (lo, n, hi)):
            errs.append(f"{name} has a negative replica count")
        if lo is not None and hi is not None and lo > hi:
            errs.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
            errs.append(f"{name}: replicas {n} outside [{lo}, {hi}]")
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get(
            "resources"
        ):
            errs.append(f"{name} sets resources in both rayStartParams and resources")
        if "labels" in params:
            errs.append(f"{name}: rayStartParams labels is not supported, use labels")
    if spec.get("authOptions", {}).get("mode") == "token":
        if not spec.get("rayVersion"):
            errs.append(f"{where}: token auth needs rayVersion")
        elif _version(spec["rayVersion"]) < MIN_RAY_FOR_TOKEN_AUTH:
            errs.append(f"{where}: token auth needs Ray >= 2.52.0, rayVersion is {spec['rayVersion']}")
    return errs


def operator_rule_errors(doc: dict[str, Any]) -> list[str]:
    kind, meta, spec = doc.get("kind"), doc.get("metadata", {}), doc.get("spec", {})
    name = meta.get("name", "")
    errs = []
    if kind == "RayCluster":
        if len(name) > MAX_RAYCLUSTER_NAME or not DNS1035.match(name):
            errs.append(
                f"RayCluster name {name!r}: a DNS-1035 label of at most {MAX_RAYCLUSTER_NAME} characters"
            )
        errs += _ray_cluster_spec_errors(spec, f"RayCluster {name}")
    elif kind == "RayJob":
        if len(name) > MAX_RAYJOB_NAME or not DNS1035.match(name):
            errs.append(f"RayJob name {name!r}: a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if ttl < 0:
            errs.append("ttlSecondsAfterFinished must not be negative")
        if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
            errs.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errs.append("suspend needs shutdownAfterJobFinishes: true")
        if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
            errs.append("exactly one of rayClusterSpec and clusterSelector")
        if spec.get("clusterSelector") and spec.get("backoffLimit", 0) > 0:
            errs.append("backoffLimit does not work with clusterSelector")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and spec[key] <= 0:
                errs.append(f"{key} must be positive")
        if spec.get("backoffLimit", 0) < 0:
            errs.append("backoffLimit must not be negative")
        if spec.get("runtimeEnvYAML") and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            errs.append("runtimeEnvYAML is not a YAML mapping")
        if spec.get("rayClusterSpec"):
            errs += _ray_cluster_spec_errors(spec["rayClusterSpec"], f"RayJob {name}")
    return errs


# --- files ---------------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(HERE.glob("*.yaml"))


def documents(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if doc is not None:
            yield f"{path.name}#{i}", doc


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or manifest_files()
    bad = 0
    for path in paths:
        for where, doc in documents(path):
            errs = schema_errors(doc) or operator_rule_errors(doc)
            label = f"{where} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            print(("FAIL " if errs else "ok   ") + label)
            for e in errs:
                print(f"     {e}")
            bad += bool(errs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
