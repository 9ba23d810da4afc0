"""Training rows (Hugging Face TRL formats) from judgements, and the export cursor.

Pure functions: no database access. ``FeedbackStore.export`` feeds them one current judgement at a
time, in the order the judgements were stored.

Formats (the image is referenced by its sha256; the snapshot builder resolves it):

- ``sft``: one ``{"prompt", "completion", "images"}`` row per fitting candidate (candidate order);
  with ``include_corrected`` also one row for the annotator's corrected rationale.
- ``dpo``: one ``{"prompt", "chosen", "rejected", "images"}`` row per (fitting, non-fitting) pair
  of one judgement; with ``include_corrected`` the corrected rationale is also chosen over every
  non-fitting candidate.
- ``kto``: one ``{"prompt", "completion", "label", "images"}`` row per candidate of a ``selected``
  or ``none_fit`` judgement (label: fitting or not); with ``include_corrected`` the corrected
  rationale is a row labelled True.

The prompt is ILLUME's rationale prompt ``Q: {question} A: {answer}, seeing that``. Completions
start with one space: TRL tokenises prompt and completion separately and concatenates the ids, so
the space that separates "that" from the rationale belongs to the completion (the stored candidate
text is stripped). Skipped judgements give no rows.

Cursor: an opaque token naming the judgement (its store sequence number) and how many of its rows
were already returned. New judgements always get a larger sequence number, so a cursor is stable
under concurrent inserts: nothing is repeated and nothing stored before the first page is missed.
A judgement revised between pages drops out (its replacement appears later, as a new judgement).
The token also carries a fingerprint of the export's parameters, so a cursor cannot be replayed
against another format or namespace.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from illume.errors import InvalidRequest
from illume.generation.prompts import rationale_prompt


def _completion(text: str) -> str:
    return " " + text


@dataclass(frozen=True)
class ExportItem:
    """What one current judgement contributes to an export."""

    question: str
    answer: str
    image_sha256: str
    verdict: str
    candidate_texts: Sequence[tuple[str, str]]  # (candidate_id, text), candidate order
    fitting: frozenset[str]
    corrected: str  # "" unless corrected rationales were asked for


def rows_for(fmt: str, item: ExportItem) -> list[dict[str, Any]]:
    """The rows of one judgement in format ``fmt`` (deterministic order)."""
    if item.verdict == "skipped":
        return []
    prompt = rationale_prompt(item.question, item.answer)
    images = [item.image_sha256]
    fit = [text for cid, text in item.candidate_texts if cid in item.fitting]
    unfit = [text for cid, text in item.candidate_texts if cid not in item.fitting]
    rows: list[dict[str, Any]] = []
    if fmt == "sft":
        rows = [{"prompt": prompt, "completion": _completion(t), "images": images} for t in fit]
        if item.corrected:
            rows.append({"prompt": prompt, "completion": _completion(item.corrected), "images": images})
    elif fmt == "dpo":
        chosen = fit + ([item.corrected] if item.corrected else [])
        rows = [
            {"prompt": prompt, "chosen": _completion(c), "rejected": _completion(r), "images": images}
            for c in chosen
            for r in unfit
        ]
    elif fmt == "kto":
        rows = [
            {
                "prompt": prompt,
                "completion": _completion(text),
                "label": cid in item.fitting,
                "images": images,
            }
            for cid, text in item.candidate_texts
        ]
        if item.corrected:
            rows.append(
                {"prompt": prompt, "completion": _completion(item.corrected), "label": True, "images": images}
            )
    else:
        raise InvalidRequest(f"unknown export format {fmt!r} (sft, dpo or kto)")
    return rows


# --- cursor ---------------------------------------------------------------------------------


def params_fingerprint(fmt: str, namespace: str, include_held_out: bool, include_corrected: bool) -> str:
    raw = json.dumps([fmt, namespace, include_held_out, include_corrected]).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def encode_cursor(seq: int, skip: int, fingerprint: str) -> str:
    raw = json.dumps({"v": 1, "s": seq, "k": skip, "p": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, fingerprint: str) -> tuple[int, int]:
    """(sequence number to resume at, rows of that judgement to skip); (0, 0) for a fresh export."""
    if not cursor:
        return 0, 0
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        seq, skip, fp = int(data["s"]), int(data["k"]), str(data["p"])
        if data.get("v") != 1 or seq < 0 or skip < 0:
            raise ValueError
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise InvalidRequest("malformed export cursor") from None
    if fp != fingerprint:
        raise InvalidRequest("the cursor belongs to an export with other parameters")
    return seq, skip
