"""Every manifest validates strictly, and validation does fail on an unknown field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.k8s.conftest import KUBERAY_SCHEMAS, render
from tests.k8s.validation import ManifestError, validate_manifest


@pytest.fixture(scope="module")
def kuberay_dir():
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (shared/ beside the clone)")
    return KUBERAY_SCHEMAS


def _id(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata", {})
    return f"{doc['kind']}/{meta.get('name', meta.get('generateName'))}"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_every_rendered_manifest_validates_strictly(rendered, overlay, kuberay_dir):
    kinds = set()
    for doc in rendered[overlay]:
        validate_manifest(doc, kuberay_dir)
        kinds.add(doc["kind"])
    assert {"RayService", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_manual_job_validates_strictly(extra_manifests, kuberay_dir):
    assert extra_manifests, "k8s/jobs/ holds the one-off round Job"
    for doc in extra_manifests:
        validate_manifest(doc, kuberay_dir)


def _find(docs, kind):
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind))


# (kind, where to put the unknown field) -- each lands in a different schema source.
INJECTIONS = [
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]),
    ("PodDisruptionBudget", lambda d: d["spec"]),
    ("NetworkPolicy", lambda d: d["spec"]),
    ("Service", lambda d: d["spec"]["ports"][0]),
    ("RayService", lambda d: d["spec"]),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]),
    (
        "RayService",
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0],
    ),
    ("RayService", lambda d: d["spec"]["serveService"]["spec"]),
    ("RayService", lambda d: d["metadata"]),
    ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0]),
]


@pytest.mark.parametrize(
    ("kind", "where"), INJECTIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(INJECTIONS)]
)
def test_an_unknown_field_fails_validation(rendered, kind, where, kuberay_dir):
    doc = _find(rendered["gpu"], kind)
    validate_manifest(doc, kuberay_dir)  # valid as rendered
    where(doc)["unknownFieldForTest"] = True
    with pytest.raises(ManifestError, match="unknownFieldForTest"):
        validate_manifest(doc, kuberay_dir)


def test_a_wrong_type_fails_validation(rendered, kuberay_dir):
    doc = _find(rendered["gpu"], "RayService")
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(ManifestError):
        validate_manifest(doc, kuberay_dir)
