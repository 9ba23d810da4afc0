"""Loader and writer for the VQA-X JSON format.

VQA-X files (as used by ILLUME and NLX-GPT) map a question id to an entry::

    {"question": str,
     "answers": [{"answer": str, "answer_confidence": str, "answer_id": int}, ...] | [str, ...],
     "explanation": [str, ...],
     "image_id": int | str,
     "image_name": str}

Images live in a directory beside the file (``image_dir``). The majority answer among ``answers``
is the item's answer; ``explanation`` holds the gold rationales. Extra keys (for example the
synthetic world's ``scene`` and ``family``) are kept in ``VQAXItem.extra``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KNOWN_KEYS = {"question", "answers", "explanation", "image_id", "image_name"}


@dataclass(frozen=True)
class VQAXItem:
    """One question about one image, with its answers and gold explanations."""

    question_id: str
    question: str
    answers: tuple[str, ...]
    explanations: tuple[str, ...]
    image_name: str
    image_path: Path
    image_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The majority answer (ties broken by first occurrence)."""
        if not self.answers:
            return ""
        counts = Counter(self.answers)
        best = max(counts.values())
        return next(a for a in self.answers if counts[a] == best)


def _answer_text(raw: Any) -> str:
    return str(raw["answer"] if isinstance(raw, dict) else raw).strip()


def _explanations(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        return (raw.strip(),)
    return tuple(str(e).strip() for e in raw or ())


def load_vqax(path: str | Path, image_dir: str | Path | None = None) -> list[VQAXItem]:
    """Read a VQA-X JSON file; ``image_dir`` defaults to ``images/`` beside it."""
    path = Path(path)
    images = Path(image_dir) if image_dir is not None else path.parent / "images"
    data = json.loads(path.read_text())
    items = []
    for qid, entry in data.items():
        items.append(
            VQAXItem(
                question_id=str(qid),
                question=str(entry["question"]).strip(),
                answers=tuple(_answer_text(a) for a in entry.get("answers", [])),
                explanations=_explanations(entry.get("explanation", [])),
                image_name=str(entry["image_name"]),
                image_path=images / str(entry["image_name"]),
                image_id=str(entry.get("image_id", "")),
                extra={k: v for k, v in entry.items() if k not in _KNOWN_KEYS},
            )
        )
    return items


def save_vqax(items: Iterable[VQAXItem], path: str | Path) -> None:
    """Write items in the VQA-X JSON format (answers as answer dicts, extras kept)."""
    out: dict[str, Any] = {}
    for item in items:
        entry: dict[str, Any] = {
            "question": item.question,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(item.answers)
            ],
            "explanation": list(item.explanations),
            "image_id": item.image_id,
            "image_name": item.image_name,
        }
        entry.update(item.extra)
        out[item.question_id] = entry
    Path(path).write_text(json.dumps(out, indent=1, sort_keys=True))
