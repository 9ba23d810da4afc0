"""Fixtures of the adapter tests: a tiny LLaVA, random LoRA adapters with manifests, a local store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from illume.adapters import served_name
from illume.adapters.artifacts import LocalArtifactStore
from illume.adapters.manifest import build_manifest
from illume.generation.generator import GenerateRequest, Generator, SamplingParams
from illume.models import ModelSettings, load_model, lora_target_regex
from illume.models.loading import base_model_fingerprint


@dataclass(frozen=True)
class StoredAdapter:
    """A random LoRA adapter: its local directory, its artifact URI and its manifest."""

    name: str
    path: Path
    uri: str
    manifest: dict


def save_random_lora(base_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A random (non-zero) LoRA adapter for the base at ``base_dir``, saved like a trained one."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(ModelSettings(path=base_dir))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=16, target_modules=lora_target_regex(loaded.model), init_lora_weights=False
    )
    get_peft_model(loaded.model, config).save_pretrained(out)
    return out


def manifest_for(path: Path, fingerprint: str, version: int) -> dict:
    return build_manifest(
        path,
        base_fingerprint=fingerprint,
        snapshot_sha256="0" * 64,
        parent_version=version - 1,
        train_config={"learning_rate": 0.01, "epochs": 1, "seed": version},
        lora_config={"r": 4, "lora_alpha": 16},
        metrics={"loss": 1.5, "rationale_loss": float("nan")},
        code_version="test",
    )


@pytest.fixture(scope="session")
def base_dir(tiny_dir) -> Path:
    return tiny_dir("llava")


@pytest.fixture(scope="session")
def fingerprint(base_dir) -> str:
    return base_model_fingerprint(base_dir)


@pytest.fixture(scope="session")
def adapter_store(tmp_path_factory) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, base_dir, fingerprint, adapter_store) -> dict[str, StoredAdapter]:
    """rationale-v1..v4 of namespace ``default``: random adapters stored in ``adapter_store`` with
    manifests, keyed by the wire label; ``.name`` is the served name ("ns-default--rationale-v1")."""
    out = {}
    for version in (1, 2, 3, 4):
        label, name = f"rationale-v{version}", served_name("default", version)
        path = save_random_lora(base_dir, tmp_path_factory.mktemp(label), seed=version)
        manifest = manifest_for(path, fingerprint, version)
        uri = adapter_store.put_dir(path, f"default/{label}")
        out[label] = StoredAdapter(name, path, uri, manifest)
    return out


@pytest.fixture
def generator(base_dir) -> Generator:
    """A fresh generator on the tiny LLaVA (function scope: the cache wraps its model)."""
    return Generator(load_model(ModelSettings(path=base_dir)))


def make_request(image, adapter: str | None = None, seed: int = 7) -> GenerateRequest:
    return GenerateRequest(
        image=image,
        question="what colour is the square?",
        answer="red",
        adapter=adapter,
        sampling=SamplingParams(n=2, temperatures=(0.9,), top_k_fraction=0.5, max_new_tokens=6, seed=seed),
    )


def signature(result) -> list[tuple]:
    return [(c.text, c.token_count, c.finish_reason, round(c.mean_logprob, 4)) for c in result.candidates]
