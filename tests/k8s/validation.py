"""Strict schema validation of manifests (unknown fields are errors).

Core kinds: ``kubernetes-validate`` (strict). RayService / RayCluster: the KubeRay CRD schemas of
``../shared/schemas/kuberay/`` made strict (``additionalProperties: false`` on every object schema
that lists its properties, as the API server's pruning would silently drop unknown fields), plus
their pod templates and metadata through ``kubernetes-validate``. PodMonitor: no schema is available
offline, so a strict schema of the subset of prometheus-operator's PodMonitor that we use.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = kubernetes_validate.latest_version()
KUBERAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}

_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
# The fields of monitoring.coreos.com/v1 PodMonitor that the manifests use (a strict subset).
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string"},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                        "targetLabel": {"type": "string"},
                                        "regex": {"type": "string"},
                                        "replacement": {"type": "string"},
                                        "action": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


class ManifestError(Exception):
    """A manifest does not validate."""


def split_image(image: str) -> tuple[str, str]:
    """``name[:tag][@digest]`` -> (name, the rest with its separator): ``reg:5000/x:1.0`` -> ``:1.0``."""
    name, at, digest = image.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:] + at + digest
    return name, at + digest


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def kuberay_validator(kuberay_dir: Path, kind: str, version: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((kuberay_dir / KUBERAY_KINDS[kind]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
            return jsonschema.Draft7Validator(schema)
    raise ManifestError(f"{kind}: KubeRay CRD has no version {version}")


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod a resource creates (Ray head and worker groups included)."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(kind, spec["template"])]
    if kind == "CronJob":
        return [(kind, spec["jobTemplate"]["spec"]["template"])]
    cluster = spec.get("rayClusterConfig") if kind == "RayService" else spec if kind == "RayCluster" else None
    if cluster is None:
        return []
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(f"worker {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def _k8s(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise ManifestError(
            f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: {exc.message}"
        ) from exc


def validate_manifest(doc: dict[str, Any], kuberay_dir: Path | None) -> None:
    """Raise ManifestError unless ``doc`` validates strictly against its schema."""
    kind = doc.get("kind")
    name = doc.get("metadata", {}).get("name", doc.get("metadata", {}).get("generateName"))
    if kind in KUBERAY_KINDS:
        if kuberay_dir is None:
            raise ManifestError("KubeRay CRD schemas are not available")
        group, _, version = doc["apiVersion"].partition("/")
        if group != "ray.io":
            raise ManifestError(f"{kind} {name}: apiVersion {doc['apiVersion']}")
        errors = sorted(kuberay_validator(kuberay_dir, kind, version).iter_errors(doc), key=str)
        if errors:
            e = errors[0]
            raise ManifestError(f"{kind} {name}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
        _k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
        for where, template in pod_templates(doc):
            try:
                _k8s(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": "t"},
                        "template": template,
                    }
                )
            except ManifestError as exc:
                raise ManifestError(f"{kind} {name} {where}: {exc}") from exc
    elif kind == "PodMonitor":
        errors = list(jsonschema.Draft7Validator(PODMONITOR_SCHEMA).iter_errors(doc))
        if errors:
            raise ManifestError(f"PodMonitor {name}: {errors[0].message}")
        _k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    else:
        _k8s(doc)
