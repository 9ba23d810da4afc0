"""The study's report from records: points per setting (mean, min-max), the PNG curves, the table."""

from __future__ import annotations

import json

import pytest

from illume.study.report import METRICS, draw_curves, load_records, series, summary_table


def val(per_question: float, answers: float = 0.9, rouge: float = 50.0) -> dict:
    return {
        "answer_accuracy": answers,
        "acceptance_per_question": {"fact": per_question, "rouge_l": per_question},
        "acceptance_per_candidate": {"fact": per_question / 4, "rouge_l": per_question / 4},
        "acceptance_greedy": {"fact": per_question / 2, "rouge_l": per_question / 2},
        "BLEU-4": 10.0,
        "METEOR": 20.0,
        "ROUGE-L": rouge,
        "CIDEr": 80.0,
    }


def record(family: str, setting: str, seed: int, rounds: list[dict], finished: bool = True) -> dict:
    name = f"{family}-{setting}-seed{seed}" if setting else f"{family}-seed{seed}"
    return {"run": name, "family": family, "setting": setting, "world_seed": seed, "finished": finished,
            "rounds": rounds, "test": rounds[-1]["val"] if finished else None}  # fmt: skip


def illume_round(k: int, per_question: float, rows: int) -> dict:
    return {
        "round": k,
        "rationale_rows": rows,
        "judged_candidates_so_far": 100 * (k + 1),
        "val": val(per_question),
    }


@pytest.fixture
def records():
    return [
        record("base", "", 2, [{"round": None, "rationale_rows": 0, "val": val(0.20)}]),
        record("base", "", 3, [{"round": None, "rationale_rows": 0, "val": val(0.30)}]),
        record("sft", "10", 2, [{"round": 0, "rationale_rows": 700, "val": val(0.40)}]),
        record("sft", "10", 3, [{"round": 0, "rationale_rows": 720, "val": val(0.50)}]),
        record("illume", "paper", 2, [illume_round(0, 0.30, 100), illume_round(1, 0.40, 300)]),
        # Seed 3 stopped after one round (or is still running): its later points are missing.
        record("illume", "paper", 3, [illume_round(0, 0.50, 200)], finished=False),
    ]


def test_points_average_over_the_seeds_that_reached_them_and_start_at_the_base(records):
    curves = series(records, METRICS["acceptance_per_question"][1])
    base, first, second = curves["illume-paper"]
    assert (base.x_round, base.rows, base.mean, base.low, base.high, base.seeds) == (
        0,
        0.0,
        25.0,
        20.0,
        30.0,
        2,
    )
    assert (first.x_round, first.rows, first.mean, first.low, first.high) == (1, 150.0, 40.0, 30.0, 50.0)
    assert (second.x_round, second.mean, second.seeds) == (2, 40.0, 1)
    (sft,) = curves["sft-10"]
    assert (sft.rows, sft.mean, sft.low, sft.high) == (710.0, 45.0, 40.0, 50.0)


def test_the_table_has_one_row_per_setting_in_order_with_mean_and_range(records):
    table = summary_table(records, [2, 3])
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == ["base", "sft-10", "illume-paper"]
    sft = rows[1].split(" | ")
    assert sft[1] == "2, 3" and sft[3] == "45.0 (40.0-50.0)" and sft[8] == "710 (700-720)"
    paper = rows[2].split(" | ")
    # The last point of each seed: round 1 of seed 2 (40 %), round 0 of seed 3 (50 %, not finished).
    assert paper[1] == "2, 3*" and paper[2] == "2, 1" and paper[3] == "45.0 (40.0-50.0)"
    assert paper[-1] == "40.0 |"  # test figures of finished runs only


def test_curves_are_png_files_one_per_metric(records, tmp_path):
    paths = draw_curves(records, tmp_path / "png", [2, 3])
    assert sorted(p.name for p in paths) == sorted(f"{m}.png" for m in METRICS)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in paths)


def test_records_of_other_seeds_and_empty_records_are_left_out(records, tmp_path):
    for r in [*records, record("sft", "10", 9, [{"round": 0, "rationale_rows": 1, "val": val(0.1)}])]:
        (tmp_path / f"{r['run']}.json").write_text(json.dumps(r))
    (tmp_path / "illume-paper-seed4.json").write_text(json.dumps(dict(records[-1], world_seed=4, rounds=[])))
    loaded = load_records(tmp_path, [2, 3, 4])
    assert sorted(r["run"] for r in loaded) == sorted(r["run"] for r in records)
