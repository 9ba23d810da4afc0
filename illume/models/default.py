"""Where the embedded default model comes from.

The project's own model ships as package data in ``illume/default_model/`` (trained on the
synthetic world). A checkout without it (for example before it is built) falls back to a small
random-weight LLaVA built locally once, so the server still starts offline; replies then name it
``illume-tiny-random``.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED_MODEL = Path(__file__).resolve().parent.parent / "default_model"
FALLBACK_NAME = "illume-tiny-random"
_FALLBACK_TEXTS = [
    "q: what colour is the square? a: red, seeing that the square is red",
    "q: is there a blue circle? a: yes, seeing that there is a blue circle left of the square",
    "q: how many triangles are there? a: 2, seeing that two green triangles are above the circle",
    "q: what shape is left of the red circle? a: square, seeing that the square is left of the circle",
    "q: are the square and the circle the same colour? a: no, seeing that the square is red",
    "the small yellow square is right of the large purple triangle and below the circle",
] * 4


def packaged_model_dir() -> Path | None:
    """The shipped default model, or None when this checkout has none."""
    return PACKAGED_MODEL if (PACKAGED_MODEL / "config.json").is_file() else None


def default_model_dir(data_dir: Path) -> Path:
    """The packaged default model, else a random-weight fallback built under ``data_dir`` once."""
    packaged = packaged_model_dir()
    if packaged is not None:
        return packaged
    fallback = Path(data_dir) / "models" / FALLBACK_NAME
    if not (fallback / "config.json").is_file():
        from illume.models.tiny import build_tiny_vlm

        build_tiny_vlm("llava", fallback, _FALLBACK_TEXTS, image_size=64, patch_size=16, hidden=64, layers=2)
    return fallback
