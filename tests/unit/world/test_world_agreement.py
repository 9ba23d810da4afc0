"""Agreement between the fact critic and the paper's ROUGE-L critic; distractor generation."""

from __future__ import annotations

import random

import pytest

from illume.world import distractor_rationales
from illume.world.agreement import Agreement, agreement_report, critic_agreement, format_report, main, perturb


def test_counts_add_up(world) -> None:
    items = world["test"][:30]
    golds = {i.question_id: list(i.rationales) for i in items}
    result = critic_agreement(items, golds, leave_one_out=True)
    assert result.total == sum(len(g) for g in golds.values())
    # Every gold is true and on point, so the fact critic accepts them all; ROUGE-L does not.
    assert result.rouge_only == 0 and result.both_reject == 0
    assert result.both_accept + result.fact_only == result.total


def test_leave_one_out_matters(world) -> None:
    items = world["test"][:10]
    golds = {i.question_id: list(i.rationales) for i in items}
    with_self = critic_agreement(items, golds)
    assert with_self.both_accept == with_self.total  # a reference scores 1.0 against itself


def test_kappa_and_sum() -> None:
    a = Agreement(both_accept=40, both_reject=40, fact_only=10, rouge_only=10)
    assert a.agreement == pytest.approx(0.8)
    assert a.kappa == pytest.approx(0.6)
    assert (a + a).total == 200
    assert Agreement().kappa == 0.0


def test_report_and_entry(world, capsys: pytest.CaptureFixture[str]) -> None:
    report = agreement_report(world["test"][:20])
    assert set(report) >= {"gold (leave-one-out)", "sampled: all"}
    assert "| gold (leave-one-out) |" in format_report(report)
    main(["--n", "10", "--seed", "1"])
    assert "sampled: all" in capsys.readouterr().out


def test_perturb_is_seeded() -> None:
    text = "the square is red and the circle is blue"
    a = [perturb(text, random.Random(i)) for i in range(20)]
    b = [perturb(text, random.Random(i)) for i in range(20)]
    assert a == b and any(x != text for x in a)


def test_distractors_are_seeded_and_distinct(world) -> None:
    item = world["train"][0]
    a = distractor_rationales(item, random.Random(3), 6)
    assert a == distractor_rationales(item, random.Random(3), 6)
    assert len(a) == len(set(a)) and 1 <= len(a) <= 6
    assert not set(a) & set(item.rationales)
