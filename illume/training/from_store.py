"""Training and gate inputs read from the feedback store.

Contract:

- ``judged_items(store, namespace, include_corrected=False)``: one ``JudgedItem`` per judged,
  non-held-out generation (``FeedbackStore.iter_judged``: at least one current non-skipped
  judgement), oldest first, for ``build_snapshot``:
  - ``accepted``: the texts of the candidates marked fitting by any annotator's current
    judgement, in candidate order, deduplicated (exact text after stripping); with
    ``include_corrected`` the annotators' corrected rationales follow (the operator's opt-in,
    docs/ARCHITECTURE.md, "Feedback provenance");
  - ``answer_correct``: False if any current judgement says the answer is wrong, else True if any
    says it is right, else None;
  - ``feedback_ids``: the current non-skipped judgements' ids; ``image``: the image sha256 (resolve
    it with ``store_image_loader``); ``round``: the adapter version that generated it (0: base);
  - ``candidates``, ``judgements``: the stored candidates and every current judgement (skips and
    corrected rationales included), from which ``build_snapshot`` takes the accepted rationales,
    their rule and weight under ``SnapshotConfig.acceptance`` and the annotators' agreement
    (``accepted`` summarises the marked candidates; corrected rationales train only with
    ``AcceptanceRule.train_corrected``, whatever ``include_corrected`` says);
  - ``item_id``: a question key, ``sha256(image sha256, normalised question)``, so several
    generations of one question (one per round) share it, as ``build_snapshot`` expects.
- ``gate_items(store, namespace, limit, include_corrected=False)``: the ``limit`` most recent
  held-out generations that have at least one fitting candidate and no judgement saying their
  answer is wrong (references that justify a wrong answer are no reference), as ``GateItem``s whose
  references are the accepted texts; images load lazily from the store. ``answer_known``: the
  client sent the answer, or an annotator judged the model's own answer right (the gate's answer
  check compares against no other answer). ``rejected``: the texts of the item's candidates no
  current judgement marked fitting (deduplicated, none equal to an accepted text), which the
  gate's preference check ranks below the accepted ones.
- ``gate_evidence(store, namespace, limit)``: how many items ``gate_items`` would return now,
  without reading an image (the LoopController and the round wait while it is below the gate's
  ``min_items``).
- ``store_image_loader(store)``: image sha256 -> decoded RGB image (``illume.images.decode_image``).
- ``flagged_annotators(store, namespace)``: the annotators of ``namespace`` with an uncleared flag
  (``FeedbackStore.annotator_flags``), for ``build_snapshot(..., flagged_annotators=...)``.
- ``agreement(store, namespace, config)``: ``reliability.annotator_agreement`` over the namespace's
  judged generations (held-out ones included: agreement does not train anything).
"""

from __future__ import annotations

import functools
import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

from illume.evaluation.gate import GateItem
from illume.store.registry import parse_version
from illume.store.types import GenerationRecord
from illume.training.reliability import (
    AnnotatorAgreement,
    ReliabilityConfig,
    annotator_agreement,
    with_admin_clears,
)
from illume.training.snapshot import AcceptanceRule, JudgedItem, answer_verdict, normalise_rationale

_IMAGE_BYTES_LIMIT = 1 << 30  # images in the store were checked when they were received


def question_key(image_sha256: str, question: str) -> str:
    """The id of a question about an image (32 hex characters)."""
    normalised = " ".join(question.lower().split())
    return hashlib.sha256(f"illume/question\0{image_sha256}\0{normalised}".encode()).hexdigest()[:32]


def _fitting_ids(record: GenerationRecord) -> set[str]:
    """The ids of the candidates any current judgement marked fitting."""
    return {cid for j in record.judgements if j.verdict == "selected" for cid in j.fitting_candidate_ids}


def _accepted(record: GenerationRecord, include_corrected: bool) -> tuple[str, ...]:
    fitting = _fitting_ids(record)
    texts = [
        c.text.strip() for c in sorted(record.candidates, key=lambda c: c.index) if c.candidate_id in fitting
    ]
    if include_corrected:
        texts += [j.corrected_rationale.strip() for j in record.judgements if j.verdict != "skipped"]
    first: dict[str, str] = {}
    for text in texts:
        if text:
            first.setdefault(normalise_rationale(text), text)
    return tuple(first.values())


def _rejected(record: GenerationRecord, accepted: tuple[str, ...]) -> tuple[str, ...]:
    """The texts of the candidates no current judgement marked fitting, in candidate order,
    deduplicated, leaving out any text equal (normalised) to an accepted one."""
    fitting = _fitting_ids(record)
    seen = {normalise_rationale(text) for text in accepted}
    out: list[str] = []
    for candidate in sorted(record.candidates, key=lambda c: c.index):
        text = candidate.text.strip()
        key = normalise_rationale(text)
        if text and candidate.candidate_id not in fitting and key not in seen:
            seen.add(key)
            out.append(text)
    return tuple(out)


def _answer_correct(record: GenerationRecord) -> bool | None:
    return answer_verdict(record.judgements)


def _round(record: GenerationRecord) -> int:
    version = parse_version(record.adapter_version) if record.adapter_version else None
    return version or 0


def judged_item(record: GenerationRecord, include_corrected: bool = False) -> JudgedItem:
    """The ``JudgedItem`` of one stored generation with its current judgements."""
    judging = [j for j in record.judgements if j.verdict != "skipped"]
    return JudgedItem(
        item_id=question_key(record.image_sha256, record.question),
        image=record.image_sha256,
        question=record.question,
        answer=record.answer,
        accepted=_accepted(record, include_corrected),
        answer_correct=_answer_correct(record),
        generation_id=record.generation_id,
        feedback_ids=tuple(j.feedback_id for j in judging),
        judged=bool(judging),
        held_out=record.held_out,
        round=_round(record),
        candidates_judged=len(record.candidates) if judging else 0,
        candidates=record.candidates,
        judgements=record.judgements,
    )


def judged_items(store: Any, namespace: str, *, include_corrected: bool = False) -> list[JudgedItem]:
    """Every judged, non-held-out generation of ``namespace`` as a ``JudgedItem`` (oldest first)."""
    return [
        judged_item(record, include_corrected)
        for record in store.iter_judged(namespace, include_held_out=False)
        if not record.held_out
    ]


def store_image_loader(store: Any) -> Callable[[str], Image.Image]:
    """A loader from image sha256 to the decoded image kept by ``store``."""
    from illume.images import ImageLimits, decode_image

    limits = ImageLimits(max_bytes=_IMAGE_BYTES_LIMIT, max_pixels=1 << 28)

    def load(image_sha256: str) -> Image.Image:
        return decode_image(store.get_image(image_sha256), limits)

    return load


def _gate_records(
    store: Any, namespace: str, include_corrected: bool
) -> Iterator[tuple[GenerationRecord, tuple[str, ...]]]:
    """Held-out generations usable by the gate, oldest first, with their references."""
    for record in store.iter_judged(namespace, include_held_out=True, only_held_out=True):
        if not record.held_out or _answer_correct(record) is False:
            continue
        references = _accepted(record, include_corrected)
        if references:
            yield record, references


def gate_evidence(store: Any, namespace: str, limit: int, *, include_corrected: bool = False) -> int:
    """How many items ``gate_items`` would return now (no image is read): the gate's evidence."""
    if limit < 1:
        return 0
    count = 0
    for _ in _gate_records(store, namespace, include_corrected):
        count += 1
        if count >= limit:
            break
    return count


def gate_items(store: Any, namespace: str, limit: int, *, include_corrected: bool = False) -> list[GateItem]:
    """The ``limit`` newest held-out generations with accepted rationales, as gate items."""
    if limit < 1:
        return []
    loader = store_image_loader(store)
    chosen: deque[GateItem] = deque(maxlen=limit)
    for record, references in _gate_records(store, namespace, include_corrected):
        chosen.append(
            GateItem(
                generation_id=record.generation_id,
                image=functools.partial(loader, record.image_sha256),
                question=record.question,
                answer=record.answer,
                references=references,
                # An answer production gave itself is a reference only once someone judged it right.
                answer_known=not record.answer_generated or _answer_correct(record) is True,
                rejected=_rejected(record, references),
            )
        )
    return list(chosen)


def flagged_annotators(store: Any, namespace: str) -> frozenset[str]:
    """The annotators of ``namespace`` flagged in the store and not cleared by an admin."""
    return frozenset(flag.annotator_id for flag in store.annotator_flags(namespace))


def cleared_annotators(store: Any, namespace: str) -> dict[str, int]:
    """The annotators of ``namespace`` whose flag an admin cleared (and that is not set again),
    with the overlap items they were flagged at (``reliability.with_admin_clears``)."""
    return {
        flag.annotator_id: flag.overlap_items
        for flag in store.annotator_flags(namespace, include_cleared=True)
        if not flag.active
    }


def agreement(
    store: Any,
    namespace: str,
    config: ReliabilityConfig | None = None,
    acceptance: AcceptanceRule | None = None,
) -> list[AnnotatorAgreement]:
    """Every annotator's agreement on ``namespace`` as a round's snapshot sees it: decisions under
    ``acceptance`` (the default rule) on the generations a round trains from (the held-out split
    left out), with the admins' clears applied."""
    rule = acceptance or AcceptanceRule()
    config = config or ReliabilityConfig()
    records = [r for r in store.iter_judged(namespace, include_held_out=False) if not r.held_out]
    return with_admin_clears(
        annotator_agreement(records, config, decide=rule.fits), cleared_annotators(store, namespace), config
    )


__all__ = [
    "agreement",
    "cleared_annotators",
    "flagged_annotators",
    "gate_evidence",
    "gate_items",
    "judged_item",
    "judged_items",
    "question_key",
    "store_image_loader",
]
