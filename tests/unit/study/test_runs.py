"""The study's runs on a tiny study: names, the grid, settings, records, no rerun, resumption."""

from __future__ import annotations

import json

import pytest

import illume.training.loop as loop_module
from illume.study import StudyConfig, parse_run, run_study_run, study_grid
from illume.study.runs import RunSpec, sft_judged
from tests.unit.study.conftest import SEED


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("base-seed2", RunSpec("base", "", 2)),
        ("sft-10-seed2", RunSpec("sft", "10", 2)),
        ("sft-100-seed14", RunSpec("sft", "100", 14)),
        ("illume-paper-seed3", RunSpec("illume", "paper", 3)),
        ("illume-paper-parent-seed3", RunSpec("illume", "paper-parent", 3)),
        ("illume-paper-rouge-seed3", RunSpec("illume", "paper-rouge", 3)),
        ("illume-paper-replay-explained-seed0", RunSpec("illume", "paper-replay-explained", 0)),
        ("illume-paper-parent-replay-explained-seed1", RunSpec("illume", "paper-parent-replay-explained", 1)),
        ("illume-minimal-2-seed4", RunSpec("illume", "minimal-2", 4)),
    ],
)
def test_run_names_round_trip(name, spec):
    assert parse_run(name) == spec and spec.name == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("sft-seed2", "percent of the pool"),
        ("sft-0-seed2", "(0, 100]"),
        ("sft-150-seed2", "(0, 100]"),
        ("illume-greedy-seed2", "unknown ILLUME setting"),
        ("illume-paper-replay-explained-parent-seed2", "in that order"),
        ("base-10-seed2", "no setting"),
        ("illume-paper", "not a study run name"),
        ("rlhf-paper-seed2", "not a study run name"),
    ],
)
def test_a_bad_run_name_is_refused_with_the_reason(name, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace("]", r"\]")):
        parse_run(name)


def test_the_grid_prunes_parent_init_and_the_rouge_critic_to_the_first_seed():
    names = [spec.name for spec in study_grid([2, 3, 4], StudyConfig())]
    for seed in (2, 3, 4):
        for setting in ("base", "sft-10", "sft-25", "sft-50", "sft-100", "illume-paper"):
            assert f"{setting}-seed{seed}" in names
        assert f"illume-minimal-2-seed{seed}" in names and f"illume-minimal-10-seed{seed}" in names
    assert [n for n in names if "parent" in n or "rouge" in n] == [
        "illume-paper-parent-seed2",
        "illume-paper-rouge-seed2",
    ]
    assert len(names) == len(set(names)) == 3 * 8 + 2


def test_settings_change_only_what_they_name():
    study = StudyConfig()
    paper = RunSpec("illume", "paper", 2).loop_config(study)
    assert (
        paper.feedback_per_round is None and paper.resample_accepted and paper.stop_after_barren_rounds == 2
    )
    assert paper.critic == "fact" and paper.train.init_from == "base" and paper.pool_size == 1500
    assert (paper.seed, paper.snapshot.seed, paper.train.seed) == (2, 2, 2)
    parent = RunSpec("illume", "paper-parent", 2).loop_config(study)
    assert parent.train.init_from == "parent" and parent.model_copy(update={"train": paper.train}) == paper
    rouge = RunSpec("illume", "paper-rouge", 2).loop_config(study)
    assert rouge.critic == "rouge_l" and rouge.model_copy(update={"critic": "fact"}) == paper
    replay = RunSpec("illume", "paper-replay-explained", 2).loop_config(study)
    assert replay.snapshot.replay_explained and not paper.snapshot.replay_explained
    assert replay.model_copy(update={"snapshot": paper.snapshot}) == paper
    both = RunSpec("illume", "paper-parent-replay-explained", 2).loop_config(study)
    assert both.train.init_from == "parent" and both.snapshot.replay_explained and both.critic == "fact"
    assert both.model_copy(update={"snapshot": paper.snapshot, "train": paper.train}) == paper
    minimal = RunSpec("illume", "minimal-2", 2).loop_config(study)
    assert minimal.feedback_per_round == 30 and not minimal.resample_accepted
    assert minimal.stop_after_barren_rounds is None
    # The LoRA shape and the training settings are the same for every run.
    assert (
        len({c.train.model_copy(update={"init_from": "base"}) for c in (paper, parent, rouge, minimal)}) == 1
    )


def test_sft_takes_every_gold_rationale_of_a_seeded_share_of_the_pool(study_context):
    pool = study_context.pool(study_context.world(SEED), SEED)
    quarter = sft_judged(pool, 0.25, SEED)
    assert len(quarter) == 2 and quarter == sft_judged(pool, 0.25, SEED)
    by_id = {item.question_id: item for item in pool}
    assert all(j.accepted == tuple(by_id[j.item_id].explanations) for j in quarter)
    whole = sft_judged(pool, 1.0, SEED)
    assert {j.item_id for j in whole} == set(by_id) and {j.item_id for j in quarter} < set(by_id)


def _val_keys(val):
    assert set(val) >= {
        "answer_accuracy",
        "acceptance_per_question",
        "acceptance_per_candidate",
        "acceptance_greedy",
    }
    assert set(val) >= {"BLEU-4", "ROUGE-L", "CIDEr"}
    assert set(val["acceptance_per_question"]) == {"fact", "rouge_l"}


def test_each_family_writes_a_finished_record_with_val_and_test_figures(study_context):
    ctx = study_context
    for name in ("base-seed3", "sft-50-seed3", "illume-paper-rouge-seed3"):
        run_study_run(parse_run(name), ctx)
        record = json.loads((ctx.records / f"{name}.json").read_text())
        assert (
            record["finished"]
            and record["world_seed"] == SEED
            and record["provenance"]["git_commit"] == "test"
        )
        assert record["model_manifest_sha256"] is None or len(record["model_manifest_sha256"]) == 64
        _val_keys(record["test"])
        for entry in record["rounds"]:
            _val_keys(entry["val"])
    sft = json.loads((ctx.records / "sft-50-seed3.json").read_text())
    (entry,) = sft["rounds"]
    assert (
        entry["gold_questions"] == 4
        and entry["rationale_rows"] >= 4
        and entry["judged_candidates_so_far"] == 0
    )
    assert sft["config"]["sft_fraction"] == 0.5 and sft["seconds"]["train"] > 0
    illume = json.loads((ctx.records / "illume-paper-rouge-seed3.json").read_text())
    assert illume["config"]["critic"] == "rouge_l" and illume["config"]["resample_accepted"]
    rounds = illume["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] or illume["stopped_early"]
    # Every round judges the whole pool, and the counts accumulate.
    assert all(r["judged_questions"] == 8 for r in rounds)
    assert rounds[-1]["judged_candidates_so_far"] == sum(r["judged_candidates"] for r in rounds)
    assert rounds[-1]["rationale_rows"] >= rounds[0]["rationale_rows"] > 0


def test_a_finished_run_is_not_run_again(study_context, monkeypatch):
    run_study_run(parse_run("sft-25-seed3"), study_context)
    path = study_context.records / "sft-25-seed3.json"
    before = path.read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("illume.training.round.train_round", refuse)
    assert run_study_run(parse_run("sft-25-seed3"), study_context)["finished"]
    assert path.read_text() == before


def test_an_interrupted_run_resumes_from_its_last_finished_round(study_context, monkeypatch):
    ctx = study_context
    spec = parse_run("illume-minimal-50-seed3")
    first = run_study_run(spec, ctx)
    assert [r["round"] for r in first["rounds"]] == [0, 1]
    # Interrupted during round 1: the record is not finished, round 1 never wrote its round.json.
    path = ctx.records / f"{spec.name}.json"
    partial = dict(first, finished=False, rounds=first["rounds"][:1])
    path.write_text(json.dumps(partial))
    round_1 = ctx.work / "runs" / spec.name / "round-1"
    (round_1 / "round.json").unlink()
    judged_before = json.loads((round_1 / "judged.json").read_text())
    asked = []
    judge = loop_module.judge_pool

    def spy(generator, items, critic, *, round_index, adapter, config):
        asked.append((round_index, adapter, [i.question_id for i in items]))
        return judge(generator, items, critic, round_index=round_index, adapter=adapter, config=config)

    monkeypatch.setattr(loop_module, "judge_pool", spy)
    resumed = run_study_run(spec, ctx)
    assert resumed["finished"] and [r["round"] for r in resumed["rounds"]] == [0, 1]
    assert [a[0] for a in asked] == [1]  # round 0 was read back, not run again
    assert asked[0][1] == ("round-0" if first["rounds"][0]["trained"] else None)
    # The resumed round asked what the uninterrupted run asked, and counted the same questions.
    assert sorted(asked[0][2]) == sorted(j["item_id"] for j in judged_before)
    assert resumed["rounds"][0] == first["rounds"][0]
    assert resumed["rounds"][1]["judged_questions_so_far"] == first["rounds"][1]["judged_questions_so_far"]
