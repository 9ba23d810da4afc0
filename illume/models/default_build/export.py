"""Writing the trained default model as a standard checkpoint directory with a manifest.

Contract: ``export(model, tokenizer, config, out_dir, ...)`` writes ``config.json``,
``model.safetensors`` (float16), ``generation_config.json``, the tokenizer and processor files
(``LlavaProcessor`` with the Pillow CLIP image processor) and ``manifest.json``. The manifest holds
the sha256 of every other file in the directory, the build command, the build config (seeds
included), the library versions, the metrics and the build time. ``verify(out_dir)`` recomputes
the hashes and returns the names of files that do not match (empty when the directory is intact).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def export(
    model: torch.nn.Module,
    tokenizer: Any,
    config: Any,
    out_dir: str | Path,
    *,
    command: str,
    metrics: dict[str, Any],
    build_seconds: float,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint (float16) and its manifest into ``out_dir`` (replacing its files)."""
    import tokenizers
    import transformers

    from illume.models.tiny import _llava_processor

    out = Path(out_dir)
    if out.exists():
        for p in out.iterdir():
            if p.is_file() and p.name != "__init__.py":
                p.unlink()
            elif p.is_dir() and p.name != "__pycache__":
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
    half = model.to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)
    processor = _llava_processor(tokenizer, config.image_size, config.patch_size, config.vision_hidden)
    processor.save_pretrained(out)
    manifest = {
        "name": "illume-default",
        "architecture": "LlavaForConditionalGeneration",
        "dtype": "float16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": command,
        "build_config": config.to_json(),
        "build_config_digest": config.digest(),
        "build_seconds": round(build_seconds, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "metrics": metrics,
        **(extra or {}),
        "files": file_hashes(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def verify(out_dir: str | Path) -> list[str]:
    """Files whose sha256 differs from the manifest, or that are missing or unlisted."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    actual = file_hashes(out)
    listed = manifest["files"]
    bad = [name for name, digest in listed.items() if actual.get(name) != digest]
    bad += [name for name in actual if name not in listed and name != "__init__.py"]
    return sorted(bad)
