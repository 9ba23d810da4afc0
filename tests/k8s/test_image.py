"""The container image: what the Dockerfile promises, and a wheel that carries stubs and model.

No image can be built here (no container engine), so the Dockerfile is checked as text and the
wheel it installs is built and inspected.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from tests.k8s.conftest import K8S_DIR, REPO_ROOT, render
from tests.k8s.validation import split_image

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def test_dockerfile_pins_its_base_and_chooses_torch_by_build_argument():
    for line in re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M):
        _name, rest = split_image(line)
        assert rest.startswith(":") and rest != ":latest", line
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", DOCKERFILE, re.M)
    assert "whl/${TORCH_VARIANT}" in DOCKERFILE
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', DOCKERFILE)


def test_dockerfile_generates_stubs_ships_the_model_and_runs_as_non_root():
    assert "grpc_tools.protoc -Iprotos" in DOCKERFILE
    assert "illume/default_model" in DOCKERFILE
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = int(users[-1].split(":")[0])
    for name in render.OVERLAYS:
        for doc in yaml.safe_load_all((K8S_DIR / "rendered" / f"{name}.yaml").read_text()):
            text = yaml.safe_dump(doc)
            if "registry.example.com/illume" in text:
                assert f"runAsUser: {uid}" in text, f"{doc['kind']} runs the image as another user"


def test_overlays_point_at_the_model_the_image_links():
    linked = re.search(r"^ENV ILLUME_DEFAULT_MODEL=(\S+)$", DOCKERFILE, re.M)
    assert linked and '"$ILLUME_DEFAULT_MODEL"' in DOCKERFILE
    for name in render.OVERLAYS:
        config = yaml.safe_load((K8S_DIR / "overlays" / name / "app-config.yaml").read_text())
        assert config["generator"]["model"]["path"] == linked.group(1)


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "node_modules", "illume/v1", "tests"):
        assert path in ignored


@pytest.mark.slow
def test_built_wheel_contains_the_stubs_and_the_default_model(tmp_path):
    if not (REPO_ROOT / "illume" / "v1" / "illume_pb2.py").exists():
        pytest.skip("stubs not generated (run `make proto`)")
    # Build from a copy, so the build leaves nothing (build/, *.egg-info) in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO_ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("illume", "services", "protos"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=ignore)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "w"),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "w").glob("illume-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("illume_pb2.py", "illume_pb2.pyi", "illume_pb2_grpc.py", "__init__.py"):
        assert f"illume/v1/{stub}" in names
    assert "services/app.py" in names
    model_dir = REPO_ROOT / "illume" / "default_model"
    if model_dir.is_dir():
        files = [p for p in model_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, "illume/default_model/ is empty"
        for path in files:
            assert path.relative_to(REPO_ROOT).as_posix() in names, f"{path} is not in the wheel"
