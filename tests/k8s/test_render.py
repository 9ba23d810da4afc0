"""`make k8s`: generated files are current, kustomize agrees, serveConfigV2 is the AppConfig."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from services.config import (
    APP_NAME,
    DEFAULT_GRPC_PORT,
    SERVICER_FUNCTIONS,
    AppConfig,
)
from tests.k8s.conftest import K8S_DIR, render


def _key(doc):
    return (doc["apiVersion"], doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])


def test_generated_files_are_up_to_date():
    files = {**render.generated_files(), **render.rendered_files()}
    stale = [
        str(p.relative_to(K8S_DIR)) for p, text in files.items() if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"stale generated files {stale}: run `make k8s` and commit the result"


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_real_kustomize_builds_the_same_objects(overlay):
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run(
        [*command, str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    theirs = {_key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {_key(d): d for d in render.build(K8S_DIR / "overlays" / overlay)}
    assert set(theirs) == set(ours)
    for key, doc in theirs.items():
        assert ours[key] == doc, f"{key} differs between kustomize and k8s/render.py"


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


def test_check_mode_reports_a_stale_patch(tmp_path, monkeypatch, capsys):
    # --check compares against the files on disk; point it at a copy with one edited patch.
    copy = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    patch = copy / "overlays" / "dev" / render.SERVE_PATCH_FILE
    patch.write_text(patch.read_text().replace("max_batch_size: 8", "max_batch_size: 9"))
    monkeypatch.setattr(render, "K8S_DIR", copy)
    monkeypatch.setattr(render, "RENDERED_DIR", copy / "rendered")
    assert render.main(["--check"]) == 1
    assert "make k8s" in capsys.readouterr().err


def test_builtin_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels"):
        render.build(Path(tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- patch: 'metadata: {labels: {a: b}}'\n  target: {kind: ConfigMap}\n"
    )
    with pytest.raises(render.RenderError, match="JSON 6902"):
        render.build(Path(tmp_path))
