"""The LoopController's gate duties against a real SQLite store (a fake Jobs API only):

- evidence: no round starts, not even a forced one, while the held-out split holds fewer usable
  items than the gate's ``min_items``; the reason names both counts; the round starts once it
  fills; a round job started anyway ends rejected before training with the same reason;
- the canary: a round in state ``canary`` waits for ``min_sample`` judged generations on each side
  (generated since the canary started), then a harmful canary (acceptance or answer accuracy
  below production beyond the tolerance) is rolled back -- canary alias removed, version
  rejected, production unchanged, the reason in the round record -- and a neutral one is promoted;
  a canary still short of its sample ``max_wait_s`` after it started (by the controller's clock)
  ends by ``on_timeout`` (promoted by default) with the wait in the reason.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image

from illume.errors import FailedPrecondition
from illume.evaluation.canary import CanaryConfig
from illume.evaluation.gate import GateConfig
from illume.models.loading import ModelSettings
from illume.store import FeedbackStore, FeedbackSubmission, NewCandidate, NewGeneration, held_out_for
from illume.store.settings import StoreSettings
from illume.store.types import parse_rfc3339, rfc3339, utcnow
from services.config import AppConfig, FeedbackLogSettings, GeneratorSettings, TuningSettings
from services.loop_controller import LoopControllerCore
from tests.unit.services.test_loop_controller import FakeJobs

FRACTION = 0.5
NS = "default"
_shade = itertools.count(1)
_keys = itertools.count()


def _png(held_out: bool) -> bytes:
    while True:
        buffer = io.BytesIO()
        shade = next(_shade)
        Image.new("RGB", (4, 4), (shade % 256, shade // 256 % 256, 7)).save(buffer, format="PNG")
        data = buffer.getvalue()
        if held_out_for(hashlib.sha256(data).hexdigest(), FRACTION) == held_out:
            return data


def _config(tmp_path: Path, **tuning) -> AppConfig:
    store = StoreSettings(url=f"sqlite:///{tmp_path / 'f.db'}", held_out_fraction=FRACTION)
    return AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=tmp_path / "model")),
        feedback_log=FeedbackLogSettings(store=store),
        tuning=TuningSettings(min_new_judgements=1, **tuning),
    )


def _judged(
    store: FeedbackStore,
    *,
    held_out: bool = False,
    version: str = "base",
    fitting: int = 1,
    candidates: int = 4,
    answer_correct: bool | None = True,
) -> None:
    """One generation of ``candidates`` candidates, ``fitting`` of them marked fitting."""
    record = store.record_generation(
        NewGeneration(
            namespace=NS,
            image=_png(held_out),
            question="what colour is the square?",
            answer="red",
            answer_generated=True,
            candidates=[NewCandidate(f"the square is red {i}", 0.3, 5) for i in range(candidates)],
            sampling={"n": candidates},
            seed=1,
            adapter_requested="",
            adapter_version=version,
            model_id="tiny",
        )
    )
    store.submit_feedback(
        FeedbackSubmission(
            generation_id=record.generation_id,
            verdict="selected" if fitting else "none_fit",
            annotator_id="ann",
            idempotency_key=f"k-{next(_keys)}",
            namespace=NS,
            fitting_candidate_ids=tuple(c.candidate_id for c in record.candidates[:fitting]),
            answer_correct=answer_correct,
        )
    )


# --- evidence --------------------------------------------------------------------------------


def test_no_round_starts_until_the_held_out_split_holds_min_items(tmp_path):
    jobs = FakeJobs("http://head:8265")
    core = LoopControllerCore(
        _config(tmp_path, gate=GateConfig(min_items=3, allow_empty=False)), holder="t", jobs=jobs
    )
    for _ in range(5):
        _judged(core.store)  # the training split: no evidence
    _judged(core.store, held_out=True)
    _judged(core.store, held_out=True)
    _judged(core.store, held_out=True, answer_correct=False)  # a wrong answer is no reference
    _judged(core.store, held_out=True, fitting=0)  # nothing accepted: no reference
    waiting = "waiting for held-out evidence: 2 of 3 items (min_items)"
    with pytest.raises(FailedPrecondition) as refused:
        core.start_round(NS, force=True)
    assert refused.value.reason == waiting
    core.tick()
    assert not jobs.submitted and core.waiting[NS] == waiting
    assert core.registry.list_rounds(NS)[0] == []  # no round record was even created

    _judged(core.store, held_out=True)
    core.tick()
    assert len(jobs.submitted) == 1 and NS not in core.waiting
    core.close()


def test_a_round_job_started_without_evidence_ends_rejected_before_training(tmp_path):
    from services.tuner import run_round

    config = _config(tmp_path, gate=GateConfig(min_items=3, allow_empty=False))
    core = LoopControllerCore(config, holder="t", jobs=FakeJobs())
    _judged(core.store)
    _judged(core.store, held_out=True)
    record = core.registry.create_round(NS, "pending")
    final = run_round(config, NS, record.round_id)  # returns before Ray is needed
    assert final.state == "rejected" and final.snapshot_sha256 == ""
    assert final.reason == "waiting for held-out evidence: 1 of 3 items (min_items)"
    core.close()


def test_the_embedded_default_refuses_promotion_without_evidence(tmp_path):
    from services.config import default_config

    config = default_config(tmp_path, tmp_path / "model")
    assert config.tuning.gate.allow_empty is False and config.tuning.gate.min_items == 10
    # A round starts after min_new_judgements accepted judgements; the split's share of them
    # is about min_items, so the first round waits little.
    fraction = config.feedback_log.store.held_out_fraction
    assert fraction * config.tuning.min_new_judgements >= config.tuning.gate.min_items


def test_the_served_gate_ranks_judged_candidates_checks_answers_and_guards_rouge(tmp_path):
    from services.config import TuningSettings, default_config

    for gate in (default_config(tmp_path, tmp_path / "model").tuning.gate, TuningSettings().gate):
        assert gate.metrics == ("preference_accuracy", "answer_accuracy", "ROUGE-L")
        assert [gate.tolerance_for(m) for m in gate.metrics] == [5.0, 5.0, 15.0]


# --- the canary ------------------------------------------------------------------------------

CANARY = CanaryConfig(enabled=True, share=0.2, min_sample=5, max_acceptance_drop=10, max_answer_drop=10)


def _canary_round(core: LoopControllerCore):
    """Production v1; v2 in the canary alias; a round in state canary for v2 started now."""
    for i in (1, 2):
        core.registry.register(NS, f"file:///adapters/{i}", {})
    core.registry.set_alias(NS, "production", 1)
    core.registry.set_alias(NS, "canary", 2, share=CANARY.share)
    record = core.registry.create_round(NS, "pending")
    return core.registry.update_round(
        record.round_id,
        "canary",
        adapter_version=2,
        scores={"canary": {"version": 2, "share": 0.2, "started_at": rfc3339(utcnow())}},
    )


@pytest.fixture
def core(tmp_path):
    core = LoopControllerCore(
        _config(tmp_path, gate=GateConfig(allow_empty=True), canary=CANARY), holder="t", jobs=FakeJobs()
    )
    yield core
    core.close()


def _serve(core, version: str, n: int, fitting: int, answer_correct: bool = True) -> None:
    for _ in range(n):
        _judged(core.store, version=version, fitting=fitting, answer_correct=answer_correct)


def test_a_harmful_canary_is_rolled_back_with_the_reason_in_the_round(core):
    _serve(core, "rationale-v2", 3, fitting=3)  # generated before the canary started: not counted
    record = _canary_round(core)
    _serve(core, "rationale-v1", 6, fitting=2)  # 50% of candidates accepted
    _serve(core, "rationale-v2", 4, fitting=0)  # 0%, but only 4 < min_sample judged
    core.tick()
    waiting = core.registry.get_round(record.round_id)
    assert waiting.state == "canary"
    assert (
        "waiting for live feedback: 4 / 6 judged generations (need 5" in waiting.scores["canary"]["waiting"]
    )

    _serve(core, "rationale-v2", 1, fitting=0)
    core.tick()
    final = core.registry.get_round(record.round_id)
    assert final.state == "rejected"
    assert final.reason == (
        "canary v2 vs production v1: rolled back: per-candidate acceptance 0.0 vs 50.0 "
        "(tolerance 10) on 5 / 6 judged generations"
    )
    assert final.scores["canary"]["action"] == "rollback"
    assert final.scores["canary"]["canary"]["generations"] == 5
    aliases = core.registry.aliases(NS)
    assert "canary" not in aliases and aliases["production"].version == 1
    assert core.registry.get(NS, 2).state == "rejected"
    assert core.active_round(NS) is None  # the next round may start


def test_a_canary_whose_answers_get_worse_is_rolled_back(core):
    record = _canary_round(core)
    _serve(core, "rationale-v1", 5, fitting=2)
    _serve(core, "rationale-v2", 3, fitting=2, answer_correct=True)
    _serve(core, "rationale-v2", 2, fitting=2, answer_correct=False)  # 60% right vs 100%
    core.tick()
    final = core.registry.get_round(record.round_id)
    assert final.state == "rejected"
    assert "answer accuracy 60.0 vs 100.0 (tolerance 10) on 5 / 5 judged answers" in final.reason
    assert "per-candidate acceptance" not in final.reason  # acceptance was within tolerance


def test_a_neutral_canary_is_promoted_to_production(core):
    record = _canary_round(core)
    _serve(core, "rationale-v1", 6, fitting=2)  # 50%
    _serve(core, "rationale-v2", 4, fitting=2)
    _serve(core, "rationale-v2", 2, fitting=1)  # 41.7%: a drop of 8.3 points, within 10
    core.tick()
    final = core.registry.get_round(record.round_id)
    assert final.state == "promoted", final.reason
    assert final.reason.startswith(
        "canary v2 vs production v1: promoted: per-candidate acceptance 41.7 vs 50.0"
    )
    aliases = core.registry.aliases(NS)
    assert "canary" not in aliases and aliases["production"].version == 2
    assert core.registry.get(NS, 2).state == "registered"


def test_a_canary_short_of_its_sample_past_max_wait_s_is_promoted(tmp_path):
    clock = [utcnow()]
    config = _config(
        tmp_path, gate=GateConfig(allow_empty=True), canary=CANARY.model_copy(update={"max_wait_s": 3600.0})
    )
    core = LoopControllerCore(config, holder="t", jobs=FakeJobs(), now=lambda: clock[0])
    try:
        record = _canary_round(core)
        clock[0] = parse_rfc3339(record.scores["canary"]["started_at"])  # the canary's start
        _serve(core, "rationale-v1", 3, fitting=2)
        _serve(core, "rationale-v2", 1, fitting=0)  # short, and bad: the timeout does not look at it
        clock[0] += timedelta(seconds=3599)
        core.tick()
        assert core.registry.get_round(record.round_id).state == "canary"

        clock[0] += timedelta(seconds=2)
        core.tick()
        final = core.registry.get_round(record.round_id)
        assert final.state == "promoted", final.reason
        assert final.reason.startswith("canary v2 vs production v1: promoted after waiting 3601 s")
        assert "1 / 3 judged generations (need 5 on each side)" in final.reason
        assert final.scores["canary"]["timed_out"] is True
        assert "waiting" not in final.scores["canary"]
        aliases = core.registry.aliases(NS)
        assert "canary" not in aliases and aliases["production"].version == 2
        assert core.active_round(NS) is None  # the next round may start
    finally:
        core.close()
