"""Shared loading for the manifest tests (no cluster needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
# CI lays shared/ beside the clone; a developer's checkout has it at the same place.
KUBERAY_SCHEMAS = REPO_ROOT.parent / "shared" / "schemas" / "kuberay"


def _load_render():
    spec = importlib.util.spec_from_file_location("illume_k8s_render", K8S_DIR / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_render()


def load_rendered(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S_DIR / "rendered" / f"{overlay}.yaml").read_text()) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """The committed rendered manifests of every overlay (checked up to date in test_render)."""
    return {name: load_rendered(name) for name in render.OVERLAYS}


@pytest.fixture(scope="session")
def extra_manifests() -> list[dict[str, Any]]:
    """Manifests outside the kustomizations (k8s/jobs/): applied by hand, checked the same way."""
    docs = []
    for path in sorted((K8S_DIR / "jobs").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs
