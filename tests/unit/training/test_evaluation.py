"""``evaluate`` and ``illume eval`` on a tiny random model: a well-formed report."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from illume.cli import main
from illume.critics import FactCritic, RougeLCritic
from illume.evaluation.evaluate import CAPTION_METRICS, evaluate

FAST = dict(n=3, temperatures=(0.7,), max_new_tokens=6, meteor=False, tokenize=False, progress=False)


@pytest.fixture(scope="module")
def report(tiny_model, tiny_world):
    return evaluate(
        tiny_model, tiny_world["val"], critics=[RougeLCritic(), FactCritic()], batch_size=4, **FAST
    )


def test_report_is_well_formed(report, tiny_world):
    val = tiny_world["val"]
    families = {item.extra["family"] for item in val}
    assert set(report.per_family) == families and len(families) == 5
    assert report.overall.items == len(val) == sum(g.items for g in report.per_family.values())
    for group in [report.overall, *report.per_family.values()]:
        assert 0.0 <= group.answer_accuracy <= 1.0
        assert set(group.captions) == set(CAPTION_METRICS) - {"METEOR"}  # meteor=False
        assert all(
            0.0 <= v <= 1000.0 and not math.isnan(v) for v in group.captions.values()
        )  # CIDEr may exceed 100
        assert set(group.acceptance) == {"rouge_l", "fact"}
        for a in group.acceptance.values():
            assert 0.0 <= a["per_candidate"] <= 1.0 and 0.0 <= a["per_question"] <= 1.0
            assert 0.0 <= a["greedy"] <= 1.0
            assert a["candidates"] <= 3 * group.items
    assert len(report.samples) == len(val)
    sample = report.samples[0]
    assert sample.conditioned_on == val[0].answer  # rationales explain the gold answer by default
    assert len(sample.candidates) <= 3 and set(sample.accepted) == {"rouge_l", "fact"}
    json.dumps(report.to_dict(samples=True))  # serialisable
    table = report.format_table()
    assert "all" in table and "answer acc" in table and all(f in table for f in families)
    assert report.settings["n"] == 3 and report.settings["condition_on"] == "gold"


def test_seeds_do_not_depend_on_limit_or_batch(report, tiny_model, tiny_world):
    part = evaluate(tiny_model, tiny_world["val"], limit=3, batch_size=2, critics=[RougeLCritic()], **FAST)
    assert part.overall.items == 3
    assert [s.candidates for s in part.samples] == [s.candidates for s in report.samples[:3]]
    assert [s.predicted_answer for s in part.samples] == [s.predicted_answer for s in report.samples[:3]]


def test_condition_on_model_answer(tiny_model, tiny_world):
    report = evaluate(
        tiny_model, tiny_world["val"], limit=2, condition_on="model", critics=[RougeLCritic()], **FAST
    )
    assert all(s.conditioned_on == s.predicted_answer for s in report.samples)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
def test_eval_cli_with_meteor_prints_json(tiny_model, tiny_world, tmp_path, capsys):
    data = tiny_world["val"][0].image_path.parent.parent
    argv = f"eval --model {tiny_model} --data {data} --split val --limit 5 --n 2 --max-new-tokens 5"
    assert main([*argv.split(), "--critic", "fact", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"]["items"] == 5
    assert 0.0 <= out["overall"]["captions"]["METEOR"] <= 100.0
    assert set(out["overall"]["acceptance"]) == {"fact"}
