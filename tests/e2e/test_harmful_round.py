"""A deliberately harmful tuning round is rejected end to end, through the public gRPC API only.

The served stack (Ingress, Generator, FeedbackLog, the LoopController submitting each round
through the Ray Jobs API, Ray Train, the gate's Ray task, the registry) runs with a gate that
demands evidence: ``MIN_ITEMS`` held-out items, no ``allow_empty``, ``TOLERANCE`` points of
held-out ROUGE-L. The session's e2e application lets every candidate through, so this module
serves the same application under the same name with a configuration of its own (its own
store, artifacts and held-out split) and puts the session's back afterwards.

- the annotator judges generations for items with gold answers: on held-out items the candidate
  closest to the gold rationale fits (the gate's references); on training items none fits and
  the annotator writes a wrong rationale -- another item's gold rationale, its words reversed --
  trained on (``train_corrected``, the operator's opt-in);
- StartTuningRound submits the round through the Jobs API; it trains on the harm and is
  rejected: its reason names a held-out metric drop of more than the tolerance measured on at
  least ``MIN_ITEMS`` items on both sides against production (the base model), no version
  becomes production and the harmful version carries no alias.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from illume.critics.rouge import normalise, rouge_l
from illume.evaluation.gate import GateConfig
from illume.store.settings import StoreSettings
from illume.training.snapshot import AcceptanceRule, SnapshotConfig

from .conftest import client, e2e_config, wait_until

pytestmark = pytest.mark.slow
APP = "illume"
TERMINAL = {"promoted", "rejected", "failed"}
MIN_ITEMS = 8
TOLERANCE = 2.0
FRACTION = 0.5  # about half the judged images are held out: both splits fill from few items
ITEMS = 24
MAX_NEW_TOKENS = 16
DROP = re.compile(
    r"held_out/ROUGE-L ([\d.]+) < production ([\d.]+) - ([\d.]+) "
    r"\(a drop of ([\d.]+) points on (\d+) / (\d+) items\)"
)


def _deploy(config) -> None:
    from ray import serve

    from services.app import build_app
    from services.config import ROUTE_PREFIX

    serve.run(build_app(config), name=APP, route_prefix=ROUTE_PREFIX)


@pytest.fixture(scope="module")
def gated_app(request, grpc_port, dashboard_port, model_dir, e2e_dir):
    """The e2e application with a gate that demands evidence, in place of the session's."""
    from ray import serve

    data = e2e_dir / "harmful-round"
    data.mkdir()
    base = e2e_config(model_dir, data, dashboard_port)
    store = StoreSettings(
        url=f"sqlite:///{data / 'feedback.db'}", image_dir=data / "images", held_out_fraction=FRACTION
    )
    tuning = base.tuning.model_copy(
        update={
            "gate": GateConfig(
                metrics=("ROUGE-L",),
                min_items=MIN_ITEMS,
                allow_empty=False,
                default_tolerance=TOLERANCE,
                tokenize=False,
                max_new_tokens=MAX_NEW_TOKENS,
            ),
            "gate_max_items": MIN_ITEMS,  # the least evidence the gate accepts: the quickest rounds
            # The annotators' written rationales train (the operator's opt-in), so the rounds learn
            # what the annotator wrote rather than what the base model happened to sample.
            "snapshot": SnapshotConfig(acceptance=AcceptanceRule(train_corrected=True)),
        }
    )
    config = base.model_copy(
        update={"feedback_log": base.feedback_log.model_copy(update={"store": store}), "tuning": tuning}
    )
    running = APP in serve.status().applications
    _deploy(config)
    yield config
    if running:  # the session's e2e application was serving: put it back
        _deploy(request.getfixturevalue("e2e_app"))
    else:
        serve.delete(APP)


def _closeness(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts after the paper critic's normalisation (the annotator's sense of 'close')."""
    return rouge_l(normalise(candidate), [normalise(reference)], beta=1.0)


def _await_round(admin, round_id: str, timeout: float = 900):
    return wait_until(
        lambda: (r := admin.get_round(round_id, timeout=30)).state in TERMINAL and r, timeout, 2.0
    )


def _run_round(port: int):
    with client(port, "admin") as admin:
        started = admin.start_round(force=True, timeout=60)
        assert started.job_id  # submitted through the Ray Jobs API
        final = _await_round(admin, started.round_id)
    assert final, "the round did not finish in time"
    return final


def test_a_harmful_round_is_rejected_with_a_metric_drop_on_min_items(gated_app, grpc_port, world):
    # Judged through the API: on held-out items the candidate closest to the gold rationale fits
    # (the gate's references); on training items none fits and the annotator writes, as the
    # rationale, another item's gold rationale with its words reversed (the harm).
    training: list[tuple[str, object]] = []  # (generation id, item) of the training split
    held_out = 0
    with client(grpc_port, "client") as c, client(grpc_port, "annotator") as a:
        for k, item in enumerate(world["train"][:ITEMS]):
            gold = item.explanations[0]
            reply = c.generate(
                Path(item.image_path).read_bytes(),
                item.question,
                item.answer,
                n=4,
                temperatures=[0.7],
                max_new_tokens=MAX_NEW_TOKENS,
                seed=k,
                timeout=300,
            )
            assert reply.candidates
            if reply.held_out:
                held_out += 1
                best = max(reply.candidates, key=lambda cand: _closeness(cand.text, gold))
                a.submit_feedback(
                    reply.generation_id,
                    fitting=[best.candidate_id],
                    answer_correct=True,
                    idempotency_key=f"held-out-{reply.generation_id}",
                )
            else:
                training.append((reply.generation_id, item))
        for k, (generation_id, _item) in enumerate(training):
            other = training[(k + 1) % len(training)][1]
            a.submit_feedback(
                generation_id,
                none_fit=True,
                answer_correct=True,
                corrected_rationale=" ".join(reversed(other.explanations[0].split())),
                idempotency_key=f"harm-{generation_id}",
            )
    assert held_out >= MIN_ITEMS and len(training) >= 4, (held_out, len(training))

    harmful = _run_round(grpc_port)
    print(f"harmful round: {harmful.state}: {harmful.reason}")
    assert harmful.rationale_rows >= len(training)  # it did train on the harm
    assert harmful.state == "rejected", harmful.reason
    drops = DROP.findall(harmful.reason)
    assert drops, harmful.reason
    for candidate, production, tolerance, drop, n_candidate, n_production in drops:
        assert float(tolerance) == TOLERANCE
        assert float(production) - float(candidate) == pytest.approx(float(drop), abs=0.011)
        assert float(drop) > TOLERANCE
        assert int(n_candidate) >= MIN_ITEMS and int(n_production) >= MIN_ITEMS

    with client(grpc_port, "admin") as admin:
        # Production is still the base model: no version carries the alias.
        adapters = admin.list_adapters(timeout=30).adapters
        assert not any("production" in adapter.aliases for adapter in adapters)
        refused = admin.get_adapter(str(harmful.adapter_version), timeout=30)
        assert refused.state in ("rejected", "deleted") and not refused.aliases
        assert admin.get_round(harmful.round_id, timeout=30).reason == harmful.reason
