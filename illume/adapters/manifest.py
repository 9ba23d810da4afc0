"""Adapter manifests: what an adapter directory holds, how it is verified, how it is published.

Manifest (``illume_manifest.json``, written by ``build_manifest`` into the adapter directory and
stored in the registry row):

- ``files``: every file of the directory except the manifest itself (relative POSIX name -> size
  and sha256); ``content_sha256``: sha256 of the canonical JSON of ``files`` -- the identity of an
  adapter's bytes; ``adapter_sha256``: ``illume.training.round.adapter_sha256`` (config + weights);
- provenance: ``base_fingerprint`` (the base checkpoint it was trained on), ``snapshot_sha256``,
  ``parent_version``, ``train_config`` with its ``config_sha256``, ``lora_config``, ``metrics``
  (non-finite numbers become null), ``code_version``.

``verify_adapter_dir(dir, manifest, base_fingerprint)`` raises ``AdapterVerificationError``
(FAILED_PRECONDITION) on a wrong base fingerprint, a missing or extra file, a size or sha256
mismatch, an unsafe file name, a manifest that is inconsistent with itself, or an in-directory
manifest that describes other bytes. The manifest to verify against is the registry's copy.

``publish_adapter`` writes the manifest into a trained adapter's directory, stores the directory
in the artifact store and registers it (the registry assigns the version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from illume.adapters import parse_served_name
from illume.adapters.artifacts import ArtifactStore, list_files
from illume.errors import AlreadyExists, FailedPrecondition, InvalidRequest, NotFound

log = logging.getLogger(__name__)

MANIFEST_NAME = "illume_manifest.json"
MANIFEST_FORMAT = 1
ADAPTER_KIND = "peft-lora"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterVerificationError(FailedPrecondition):
    """An adapter's files, manifest or base model do not match (maps to FAILED_PRECONDITION)."""


class AdapterConflict(AlreadyExists):
    """A loaded adapter name would be overwritten with other weights (maps to ALREADY_EXISTS)."""


# --- manifests -------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same bytes on every machine."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _files_of(adapter_dir: Path) -> dict[str, dict[str, Any]]:
    files = list_files(adapter_dir)
    files.pop(MANIFEST_NAME, None)
    return files


def build_manifest(
    adapter_dir: str | Path,
    *,
    base_fingerprint: str,
    snapshot_sha256: str,
    parent_version: int,
    train_config: Mapping[str, Any],
    lora_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    code_version: str,
) -> dict[str, Any]:
    """Describe ``adapter_dir`` (checksums + provenance) and write it as ``illume_manifest.json``."""
    from illume.training.round import adapter_sha256

    adapter_dir = Path(adapter_dir)
    files = _files_of(adapter_dir)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise InvalidRequest(f"{adapter_dir} lacks {', '.join(missing)} (a peft save_pretrained directory)")
    if not base_fingerprint:
        raise InvalidRequest("base_fingerprint is required")
    train = _finite(dict(train_config))
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": ADAPTER_KIND,
        "files": files,
        "content_sha256": sha256_json(files),
        "adapter_sha256": adapter_sha256(adapter_dir),
        "base_fingerprint": base_fingerprint,
        "snapshot_sha256": snapshot_sha256,
        "parent_version": int(parent_version),
        "train_config": train,
        "config_sha256": sha256_json(train),
        "lora_config": _finite(dict(lora_config)),
        "metrics": _finite(dict(metrics)),
        "code_version": code_version,
    }
    (adapter_dir / MANIFEST_NAME).write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def read_manifest(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``illume_manifest.json`` of a directory."""
    path = Path(adapter_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{path} not found") from None


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and ".." not in parts
        and "." not in parts
    )


def verify_adapter_dir(adapter_dir: str | Path, manifest: Mapping[str, Any], base_fingerprint: str) -> None:
    """Raise ``AdapterVerificationError`` unless ``adapter_dir`` holds exactly the manifest's bytes
    and the manifest names ``base_fingerprint`` (see the module docstring)."""
    adapter_dir = Path(adapter_dir)
    fail = AdapterVerificationError
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("kind") != ADAPTER_KIND:
        raise fail(f"unsupported manifest (format {manifest.get('format')!r}, kind {manifest.get('kind')!r})")
    expected = manifest.get("files")
    if not isinstance(expected, Mapping) or not expected:
        raise fail("the manifest lists no files")
    if manifest.get("content_sha256") != sha256_json(dict(expected)):
        raise fail("the manifest's content_sha256 does not match its file list")
    if manifest.get("base_fingerprint") != base_fingerprint:
        raise fail(
            f"adapter was trained on base {str(manifest.get('base_fingerprint'))[:12]}, "
            f"this replica serves base {base_fingerprint[:12]}"
        )
    unsafe = [name for name in expected if not _safe_name(name) or name == MANIFEST_NAME]
    if unsafe:
        raise fail(f"unsafe file name {unsafe[0]!r} in the manifest")
    missing_required = [name for name in REQUIRED_FILES if name not in expected]
    if missing_required:
        raise fail(f"the manifest lacks {', '.join(missing_required)}")
    try:
        actual = _files_of(adapter_dir)
    except (NotFound, InvalidRequest) as exc:
        raise fail(f"cannot read {adapter_dir}: {exc.reason}") from None
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        raise fail(f"file {missing[0]} is missing ({len(missing)} missing)")
    if extra:
        raise fail(f"unexpected file {extra[0]} ({len(extra)} not in the manifest)")
    for name, meta in sorted(expected.items()):
        got = actual[name]
        if got["size"] != meta.get("size") or got["sha256"] != meta.get("sha256"):
            raise fail(f"checksum mismatch for {name}")
    in_dir = adapter_dir / MANIFEST_NAME
    if in_dir.is_file():
        try:
            local = json.loads(in_dir.read_text())
        except ValueError:
            raise fail(f"{MANIFEST_NAME} in the directory is not JSON") from None
        if local.get("content_sha256") != manifest.get("content_sha256") or local.get(
            "base_fingerprint"
        ) != manifest.get("base_fingerprint"):
            raise fail(f"{MANIFEST_NAME} in the directory describes another adapter")


def check_peft_files(adapter_dir: str | Path) -> dict[str, Any]:
    """Parse the peft config and the safetensors header (cheap checks done before the lock)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterVerificationError(f"adapter_config.json is unreadable: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterVerificationError(f"peft_type {config.get('peft_type')!r} is not LORA")
    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterVerificationError(f"adapter_model.safetensors is unreadable: {exc}") from None
    if not keys or not all("lora_" in k for k in keys):
        raise AdapterVerificationError("adapter_model.safetensors holds no (or non-LoRA) tensors")
    return config


def check_adapter_name(name: str) -> tuple[str, int]:
    """(namespace, version) of a served adapter name ``ns-<namespace>--rationale-v<N>``
    (``illume.adapters.served_name``); ``InvalidRequest`` for any other name, the bare wire label
    ``rationale-v<N>`` included (it does not say whose version it is)."""
    parsed = parse_served_name(name)
    if parsed is None:
        raise InvalidRequest(f"adapter name {name!r} is not of the form ns-<namespace>--rationale-v<N>")
    return parsed


def publish_adapter(
    registry: Any,
    artifacts: ArtifactStore,
    adapter_dir: str | Path,
    *,
    namespace: str,
    key: str,
    base_fingerprint: str,
    snapshot_sha256: str,
    parent_version: int,
    train_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    code_version: str,
    round_id: str = "",
) -> Any:
    """Write the manifest into ``adapter_dir``, store the directory under ``key`` and register it.

    Returns the registry's record (the version number is the registry's). The LoRA config is read
    from the directory's ``adapter_config.json``.
    """
    adapter_dir = Path(adapter_dir)
    manifest = build_manifest(
        adapter_dir,
        base_fingerprint=base_fingerprint,
        snapshot_sha256=snapshot_sha256,
        parent_version=parent_version,
        train_config=train_config,
        lora_config=json.loads((adapter_dir / "adapter_config.json").read_text()),
        metrics=metrics,
        code_version=code_version,
    )
    uri = artifacts.put_dir(adapter_dir, key)
    return registry.register(namespace, uri, manifest, round_id=round_id, parent_version=parent_version)
