"""The canary stage: a gate-passed adapter serves a share of traffic before it becomes production.

Contract (docs/ARCHITECTURE.md, "The canary"):

- ``CanaryConfig``: ``enabled``, the canary's ``share`` of unpinned traffic (routing sends that share
  to the ``canary`` alias), the ``min_sample`` of judged generations each side needs, the
  tolerated drops (``max_acceptance_drop``, ``max_answer_drop``, in points), how long the canary
  may wait for its sample (``max_wait_s``) and what a wait that runs out does (``on_timeout``);
- ``tally(records, since)``: per adapter version (0: the base model), the feedback on generations
  created at or after ``since``: judged generations (a current non-skipped judgement), judged and
  accepted candidates (marked fitting by any current judgement), answers judged and judged correct
  (``answer_verdict``: wrong if any judgement says so);
- ``decide_canary(canary, production, config, waited_s)``: while either side has fewer than
  ``min_sample`` judged generations it returns ``wait`` as long as ``waited_s`` (seconds since the
  canary started) is below ``max_wait_s``, and once it is not, the ``on_timeout`` action
  (``promote``: the gate's held-out evidence alone stands; ``rollback``) with ``timed_out`` set
  and a reason naming the wait, the sample on each side and ``min_sample`` -- whatever the short
  sample shows, so the outcome of a timeout never depends on a handful of judgements. With
  ``min_sample`` on both sides the wait plays no part: ``rollback`` when the canary's
  per-candidate acceptance is below production's by more than ``max_acceptance_drop``, or --
  when both sides have at least ``min_sample`` judged answers -- its answer accuracy by more than
  ``max_answer_drop``; else ``promote``. The reason names each compared metric, both values, the
  tolerance and the sample on each side, so a neutral canary (within tolerance) is promoted and
  a harmful one is rolled back with the drop that condemned it. The ``wait`` reason does not
  change with the time waited (the controller records it only when it changes).

Plain Python (no Ray): the LoopController calls it on every pass (``services.loop_controller``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from illume.store.registry import parse_version
from illume.store.types import GenerationRecord
from illume.training.snapshot import answer_verdict


class CanaryConfig(BaseModel):
    """The canary stage between the gate and production."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        False,
        description="Send a gate-passed adapter to the 'canary' alias first (serving 'share' of unpinned "
        "traffic); the LoopController promotes it or rolls it back on live feedback. False: the gate "
        "promotes straight to production.",
    )
    share: float = Field(0.2, gt=0, le=1, description="The canary's share of unpinned traffic.")
    min_sample: int = Field(
        20,
        ge=1,
        description="Judged generations (created since the canary started) each side needs before "
        "the canary is judged; answer accuracy is compared only when each side has this many "
        "judged answers.",
    )
    max_acceptance_drop: float = Field(
        10.0,
        ge=0,
        description="Largest tolerated drop of per-candidate acceptance (share of judged candidates "
        "marked fitting), in points, canary below production.",
    )
    max_answer_drop: float = Field(
        10.0,
        ge=0,
        description="Largest tolerated drop of answer accuracy, in points, canary below production.",
    )
    max_wait_s: float = Field(
        86400.0,
        gt=0,
        description="How long a canary may wait for its sample (min_sample judged generations on "
        "each side), in seconds since it started; then on_timeout decides.",
    )
    on_timeout: Literal["promote", "rollback"] = Field(
        "promote",
        description="What happens when max_wait_s runs out before both sides have min_sample "
        "judged generations (whatever the short sample shows): 'promote' moves production to the "
        "canary on the gate's held-out evidence alone; 'rollback' removes the canary alias and "
        "marks its version rejected.",
    )


@dataclass(frozen=True)
class ArmStats:
    """Live feedback on one adapter version's generations."""

    version: int
    generations: int = 0  # judged generations
    candidates: int = 0  # candidates of the judged generations
    accepted: int = 0  # of them, marked fitting by a current judgement
    answers_judged: int = 0
    answers_correct: int = 0

    @property
    def acceptance(self) -> float:
        """Per-candidate acceptance in percent (nan without a judged candidate)."""
        return 100.0 * self.accepted / self.candidates if self.candidates else float("nan")

    @property
    def answer_accuracy(self) -> float:
        """Answer accuracy in percent (nan without a judged answer)."""
        return 100.0 * self.answers_correct / self.answers_judged if self.answers_judged else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance": self.acceptance, "answer_accuracy": self.answer_accuracy}


def version_of(label: str) -> int:
    """The registry version a generation's ``adapter_version`` label names (0: the base model)."""
    return (parse_version(label) if label else None) or 0


def tally(records: Iterable[GenerationRecord], since: datetime | None = None) -> dict[int, ArmStats]:
    """Feedback per adapter version on the generations created at or after ``since``."""
    counts: dict[int, dict[str, int]] = {}
    for record in records:
        if since is not None and record.created_at < since:
            continue  # generated before the canary started: not a like-for-like comparison
        judging = [j for j in record.judgements if j.verdict != "skipped"]
        if not judging:
            continue
        c = counts.setdefault(
            version_of(record.adapter_version),
            dict.fromkeys(("generations", "candidates", "accepted", "answers_judged", "answers_correct"), 0),
        )
        own = {cand.candidate_id for cand in record.candidates}
        fitting = {cid for j in judging if j.verdict == "selected" for cid in j.fitting_candidate_ids} & own
        c["generations"] += 1
        c["candidates"] += len(record.candidates)
        c["accepted"] += len(fitting)
        verdict = answer_verdict(judging)
        if verdict is not None:
            c["answers_judged"] += 1
            c["answers_correct"] += int(verdict)
    return {version: ArmStats(version, **c) for version, c in counts.items()}


@dataclass(frozen=True)
class CanaryDecision:
    """What to do with the canary now, why, and the numbers compared."""

    action: Literal["wait", "promote", "rollback"]
    reason: str
    canary: ArmStats
    production: ArmStats
    timed_out: bool = False  # decided by on_timeout: the sample was short when max_wait_s ran out

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "timed_out": self.timed_out,
            "canary": self.canary.to_dict(),
            "production": self.production.to_dict(),
        }


def decide_canary(
    canary: ArmStats, production: ArmStats, config: CanaryConfig, waited_s: float = 0.0
) -> CanaryDecision:
    """Wait for ``min_sample`` judged generations on each side, then promote or roll back; after
    ``waited_s >= max_wait_s`` with the sample still short, do ``on_timeout``."""
    name = f"canary v{canary.version} vs production v{production.version}"
    if canary.generations < config.min_sample or production.generations < config.min_sample:
        sample = (
            f"{canary.generations} / {production.generations} judged generations "
            f"(need {config.min_sample} on each side"
        )
        if waited_s < config.max_wait_s:
            # No elapsed time in the reason: it is recorded only when it changes.
            return CanaryDecision(
                "wait",
                f"{name}: waiting for live feedback: {sample}; at most {config.max_wait_s:g} s, "
                f"then {config.on_timeout})",
                canary,
                production,
            )
        waited = f"after waiting {waited_s:.0f} s (max_wait_s {config.max_wait_s:g}): {sample})"
        if config.on_timeout == "promote":
            reason = f"{name}: promoted {waited}; the gate's held-out evidence stands"
        else:
            reason = f"{name}: rolled back {waited}; on_timeout is rollback"
        return CanaryDecision(config.on_timeout, reason, canary, production, timed_out=True)
    failures: list[str] = []
    compared: list[str] = []
    sample = f"on {canary.generations} / {production.generations} judged generations"
    drop = production.acceptance - canary.acceptance
    line = (
        f"per-candidate acceptance {canary.acceptance:.1f} vs {production.acceptance:.1f} "
        f"(tolerance {config.max_acceptance_drop:g}) {sample}"
    )
    (failures if drop > config.max_acceptance_drop else compared).append(line)
    if min(canary.answers_judged, production.answers_judged) >= config.min_sample:
        drop = production.answer_accuracy - canary.answer_accuracy
        line = (
            f"answer accuracy {canary.answer_accuracy:.1f} vs {production.answer_accuracy:.1f} "
            f"(tolerance {config.max_answer_drop:g}) on {canary.answers_judged} / "
            f"{production.answers_judged} judged answers"
        )
        (failures if drop > config.max_answer_drop else compared).append(line)
    else:
        compared.append(
            f"answer accuracy not compared ({canary.answers_judged} / {production.answers_judged} "
            f"judged answers < {config.min_sample})"
        )
    if failures:
        return CanaryDecision("rollback", f"{name}: rolled back: " + "; ".join(failures), canary, production)
    return CanaryDecision("promote", f"{name}: promoted: " + "; ".join(compared), canary, production)


__all__ = ["ArmStats", "CanaryConfig", "CanaryDecision", "decide_canary", "tally", "version_of"]
