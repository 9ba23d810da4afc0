"""The in-process ILLUME loop on a tiny model: rounds sample with the previous round's adapter."""

from __future__ import annotations

import json

import illume.training.loop as loop_module
from illume.training import Snapshot, SnapshotConfig, TrainConfig
from illume.training.loop import LoopConfig, run_loop


def test_two_rounds_accumulate_train_and_sample_with_the_previous_adapter(
    tiny_model, tiny_world, tmp_path, monkeypatch
):
    used_adapters = []
    judge = loop_module.judge_pool

    def spy(generator, items, critic, *, round_index, adapter, config):
        used_adapters.append(adapter)
        return judge(generator, items, critic, round_index=round_index, adapter=adapter, config=config)

    monkeypatch.setattr(loop_module, "judge_pool", spy)
    config = LoopConfig(
        rounds=2,
        pool_size=8,
        feedback_per_round=6,
        critic="rouge_l",
        rouge_threshold=0.05,  # a random model must get something accepted
        n=3,
        temperatures=(1.0,),
        top_k_fraction=1.0,
        max_new_tokens=6,
        batch_size=4,
        val_limit=3,
        eval_critics=("rouge_l",),
        eval_n=2,
        eval_baseline=False,
        meteor=False,
        snapshot=SnapshotConfig(replay_ratio=1),
        train=TrainConfig(learning_rate=0.05, epochs=1, batch_size=4),
    )
    lines = []
    result = run_loop(tiny_model, tiny_world["train"], tiny_world["val"], config, out_dir=tmp_path,
                      progress=False, log=lines.append)  # fmt: skip
    first, second = result.rounds
    assert used_adapters == [None, "round-0"]  # round k samples with the adapter of round k-1
    assert first.feedback == 6 and first.accepted_questions > 0 and first.trained
    assert first.rationale_rows > 0 and first.answer_rows <= first.rationale_rows
    # Questions with an accepted rationale are not asked again; their rationales stay (accumulation).
    assert second.feedback == min(6, 8 - first.accepted_questions)
    assert second.rationale_rows >= first.rationale_rows
    assert second.questions_with_rationale >= first.questions_with_rationale
    snap0 = Snapshot.load(tmp_path / "round-0" / "snapshot.json")
    snap1 = Snapshot.load(tmp_path / "round-1" / "snapshot.json")
    rows0 = {(r.source_id, r.target) for r in snap0.rows if r.kind == "rationale"}
    assert rows0 <= {(r.source_id, r.target) for r in snap1.rows if r.kind == "rationale"}
    # The answer rows are topped up from the pool's questions that were not judged that round
    # (8 in the pool, 6 judged: 2 left).
    m0 = snap0.manifest
    judged0 = set(m0.rationale_sources) | set(m0.answer_sources)
    wanted = min(2, first.rationale_rows - len(m0.answer_sources))
    assert wanted > 0 and len(m0.pool_sources) == wanted
    assert not set(m0.pool_sources) & judged0
    assert set(m0.pool_sources) <= {i.question_id for i in tiny_world["train"]}
    assert (tmp_path / "round-1" / "adapter" / "adapter_model.safetensors").is_file()
    assert 0.0 <= second.val["answer_accuracy"] <= 1.0 and "rouge_l" in second.val["acceptance_per_question"]
    assert len(lines) == 3 and lines[1].split()[0] == "0"  # header + one line per round
    assert json.loads((tmp_path / "loop.json").read_text())["rounds"][1]["round"] == 1


def test_the_loop_verb_passes_the_lora_projections_and_the_schedule_to_the_train_config(
    tmp_path, monkeypatch
):
    from illume.cli import main

    seen = []

    class Done:
        seconds = 0.0

    def record(model_dir, train, val, config, **kwargs):
        seen.append(config.train)
        return Done()

    monkeypatch.setattr(loop_module, "run_loop", record)
    common = ["loop", "--pool", "4", "--val-limit", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    options = ["--lora-projections", "q_proj,gate_proj,down_proj", "--lr-schedule", "linear"]
    assert main([*common, "--out", str(tmp_path / "b"), *options]) == 0
    assert seen[0].lora_projections == TrainConfig().lora_projections and seen[0].lr_schedule == "constant"
    assert seen[1].lr_schedule == "linear"
    assert seen[1].lora_projections == ("q_proj", "gate_proj", "down_proj")


def test_the_loop_replays_answers_of_explained_questions_by_default_and_the_flag_turns_it_off(
    tmp_path, monkeypatch
):
    # The study's step 3 (docs/STUDY.md) named answer replay from every answered question the
    # better paper-protocol setting: the in-process loop's default, not the snapshot's own (the
    # served loop's), and the study's reference runs keep the paper's.
    from illume.cli import main
    from illume.study.runs import StudyConfig, parse_run

    seen = []

    class Done:
        seconds = 0.0

    monkeypatch.setattr(loop_module, "run_loop", lambda *a, **k: seen.append(a[3].snapshot) or Done())
    common = ["loop", "--pool", "4", "--val-limit", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--no-replay-explained"]) == 0
    assert [s.replay_explained for s in seen] == [True, False]
    assert LoopConfig().snapshot.replay_explained and not SnapshotConfig().replay_explained
    assert not parse_run("illume-paper-seed2").loop_config(StudyConfig()).snapshot.replay_explained


def _barren_config(**update):
    # ROUGE-L of a random model's candidates never reaches 1.0: no round accepts anything.
    return LoopConfig(
        rounds=3,
        pool_size=6,
        critic="rouge_l",
        rouge_threshold=1.0,
        n=2,
        temperatures=(1.0,),
        top_k_fraction=1.0,
        max_new_tokens=4,
        batch_size=4,
        val_limit=2,
        eval_critics=("rouge_l",),
        eval_n=1,
        eval_baseline=False,
        meteor=False,
        **update,
    )


def test_the_loop_stops_after_the_configured_barren_rounds(tiny_model, tiny_world, tmp_path):
    result = run_loop(tiny_model, tiny_world["train"], tiny_world["val"],
                      _barren_config(stop_after_barren_rounds=2), out_dir=tmp_path, progress=False,
                      log=lambda line: None)  # fmt: skip
    assert [r.round for r in result.rounds] == [0, 1] and not any(r.trained for r in result.rounds)
    assert result.stopped_early and "2 rounds in a row" in result.stopped_early
    assert json.loads((tmp_path / "loop.json").read_text())["stopped_early"] == result.stopped_early
    unbounded = run_loop(tiny_model, tiny_world["train"], tiny_world["val"], _barren_config(),
                         out_dir=tmp_path / "all", progress=False, log=lambda line: None)  # fmt: skip
    assert len(unbounded.rounds) == 3 and unbounded.stopped_early is None


def test_answers_are_replayed_from_the_given_split_when_every_pool_question_has_a_rationale(
    tiny_model, tiny_world, tmp_path
):
    config = LoopConfig(
        rounds=1,
        pool_size=4,
        resample_accepted=True,
        critic="rouge_l",
        rouge_threshold=0.01,  # everything with a word in common is accepted
        n=3,
        temperatures=(1.0,),
        top_k_fraction=1.0,
        max_new_tokens=8,
        batch_size=4,
        val_limit=2,
        eval_critics=("rouge_l",),
        eval_n=1,
        eval_baseline=False,
        meteor=False,
        snapshot=SnapshotConfig(replay_ratio=2),
        train=TrainConfig(learning_rate=0.05, epochs=1, batch_size=4),
    )
    result = run_loop(tiny_model, tiny_world["train"], tiny_world["val"], config, out_dir=tmp_path,
                      progress=False, log=lambda line: None, replay_from=tiny_world["train"])  # fmt: skip
    snapshot = Snapshot.load(tmp_path / "round-0" / "snapshot.json")
    pool_ids = set(snapshot.manifest.rationale_sources) | set(snapshot.manifest.answer_sources)
    replayed = {s.removeprefix("pool:") for s in snapshot.manifest.pool_sources}
    assert result.rounds[0].answer_rows > 0 and replayed
    assert replayed <= {i.question_id for i in tiny_world["train"]} and not replayed & pool_ids
