"""The study's report: curves (PNG) and a summary table (Markdown) from the runs' JSON records.

Contract:

- ``load_records(directory, seeds)`` reads every record of those world seeds (finished or not);
- ``series(records, metric)`` groups them by setting (``sft-10``, ``illume-paper``, ...) and gives,
  per setting, the mean and min-max over seeds at each point: for an ILLUME run point 0 is its
  world's base model and point k + 1 its round k; an SFT run is one point; a point is averaged
  over the seeds that reached it, and says how many did;
- ``draw_curves(records, out, seeds)`` writes one PNG per metric (per-question and per-candidate
  acceptance under the fact critic, ROUGE-L against gold), each with two panels: against rounds
  (SFT drawn as horizontal lines) and against rationale rows used (SFT as points); returns the
  paths;
- ``summary_table(records, seeds)`` gives one Markdown row per setting at its last point: the
  val figures (mean and min-max over seeds), answer accuracy, rationale rows, judged candidates,
  and the test figure of per-question acceptance.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Metric = Callable[[dict[str, Any]], float]

METRICS: dict[str, tuple[str, Metric]] = {
    "acceptance_per_question": (
        "val questions with an accepted candidate (fact critic, %)",
        lambda v: 100 * v["acceptance_per_question"]["fact"],
    ),
    "acceptance_per_candidate": (
        "val candidates accepted (fact critic, %)",
        lambda v: 100 * v["acceptance_per_candidate"]["fact"],
    ),
    "rouge_l": ("ROUGE-L of the greedy rationale against gold", lambda v: v["ROUGE-L"]),
}


@dataclass(frozen=True)
class Point:
    """One point of a setting's curve: the mean over seeds and its range."""

    x_round: int
    rows: float
    mean: float
    low: float
    high: float
    seeds: int


def load_records(directory: Path, seeds: Sequence[int]) -> list[dict[str, Any]]:
    wanted = set(seeds)
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    return [r for r in records if r.get("world_seed") in wanted and r.get("rounds")]


def setting_of(record: dict[str, Any]) -> str:
    return f"{record['family']}-{record['setting']}" if record["setting"] else record["family"]


def _points(record: dict[str, Any], base: dict[str, Any] | None) -> list[tuple[int, float, dict[str, Any]]]:
    """(x, rationale rows, val) per point of one run; ILLUME runs start at their world's base."""
    if record["family"] == "base":
        return [(0, 0.0, record["rounds"][0]["val"])]
    if record["family"] == "sft":
        r = record["rounds"][0]
        return [(1, float(r["rationale_rows"]), r["val"])]
    points = [(0, 0.0, base["rounds"][0]["val"])] if base else []
    return points + [(r["round"] + 1, float(r["rationale_rows"]), r["val"]) for r in record["rounds"]]


def series(records: Sequence[dict[str, Any]], metric: Metric) -> dict[str, list[Point]]:
    """Per setting, the mean and min-max over seeds at each point (see the module docstring)."""
    bases = {r["world_seed"]: r for r in records if r["family"] == "base"}
    grouped: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for x, rows, val in _points(record, bases.get(record["world_seed"])):
            grouped[setting_of(record)][x].append((rows, metric(val)))
    out: dict[str, list[Point]] = {}
    for setting, by_x in grouped.items():
        out[setting] = [
            Point(
                x_round=x,
                rows=sum(r for r, _ in values) / len(values),
                mean=sum(v for _, v in values) / len(values),
                low=min(v for _, v in values),
                high=max(v for _, v in values),
                seeds=len(values),
            )
            for x, values in sorted(by_x.items())
        ]
    return out


def _draw(metric_name: str, records: Sequence[dict[str, Any]], path: Path, seeds: Sequence[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    label, metric = METRICS[metric_name]
    curves = series(records, metric)
    fig, (by_round, by_rows) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    illume = sorted(s for s in curves if s.startswith("illume"))
    sft = sorted((s for s in curves if s.startswith("sft")), key=lambda s: float(s.split("-")[1]))
    for i, setting in enumerate(illume):
        points = curves[setting]
        colour = colours[i % len(colours)]
        for axis, xs in ((by_round, [p.x_round for p in points]), (by_rows, [p.rows for p in points])):
            axis.plot(xs, [p.mean for p in points], marker="o", color=colour, label=setting)
            axis.fill_between(xs, [p.low for p in points], [p.high for p in points], color=colour, alpha=0.15)
    greys = ["#bbbbbb", "#888888", "#555555", "#222222"]
    for i, setting in enumerate(sft):
        (point,) = curves[setting][-1:]
        grey = greys[min(i, len(greys) - 1)]
        by_round.axhline(point.mean, color=grey, linestyle="--", label=f"{setting} (gold)")
        by_round.axhspan(point.low, point.high, color=grey, alpha=0.08)
        by_rows.errorbar(
            [point.rows],
            [point.mean],
            yerr=[[point.mean - point.low], [point.high - point.mean]],
            fmt="s",
            color=grey,
            label=f"{setting} (gold)",
        )
    if "base" in curves:
        by_round.axhline(curves["base"][0].mean, color="black", linestyle=":", label="base model")
    by_round.set_xlabel("rounds (0: the base model)")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_rows.set_xlabel("rationale rows trained on")
    by_rows.set_xscale("symlog", linthresh=100)
    by_rows.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    for axis in (by_round, by_rows):
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    by_round.legend(fontsize=8, loc="best")
    fig.suptitle(f"{label}: mean and min-max over world seeds {', '.join(map(str, seeds))}")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_curves(records: Sequence[dict[str, Any]], out: Path, seeds: Sequence[int]) -> list[Path]:
    """One PNG per metric in ``out`` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    return [_draw(name, records, out / f"{name}.png", seeds) for name in METRICS]


def _cell(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summary_table(records: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    """One Markdown row per setting at its last point (see the module docstring)."""
    by_setting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_setting[setting_of(record)].append(record)

    def order(setting: str) -> tuple[int, float, str]:
        family = setting.split("-")[0]
        rank = {"base": 0, "sft": 1, "illume": 2}[family]
        share = float(setting.split("-")[1]) if family == "sft" else 0.0
        return rank, share, setting

    header = (
        "| setting | seeds | rounds per seed | val acc/q % | val acc/cand % | val greedy % | ROUGE-L "
        "| answers % | rationale rows | judged candidates | test acc/q % |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for setting in sorted(by_setting, key=order):
        runs = sorted(by_setting[setting], key=lambda r: r["world_seed"])
        last = [r["rounds"][-1] for r in runs]
        vals = [x["val"] for x in last]
        tests = [r["test"] for r in runs if r.get("test")]
        seeds_text = ", ".join(f"{r['world_seed']}{'' if r['finished'] else '*'}" for r in runs)
        lines.append(
            "| "
            + " | ".join(
                [
                    setting,
                    seeds_text,
                    ", ".join(str(len(r["rounds"])) for r in runs) if runs[0]["family"] == "illume" else "-",
                    _cell([100 * v["acceptance_per_question"]["fact"] for v in vals]),
                    _cell([100 * v["acceptance_per_candidate"]["fact"] for v in vals], 2),
                    _cell([100 * v["acceptance_greedy"]["fact"] for v in vals]),
                    _cell([v["ROUGE-L"] for v in vals]),
                    _cell([100 * v["answer_accuracy"] for v in vals]),
                    _cell([x.get("rationale_rows", 0) for x in last], 0),
                    _cell([x.get("judged_candidates_so_far", 0) for x in last], 0),
                    _cell([100 * t["acceptance_per_question"]["fact"] for t in tests]),
                ]
            )
            + " |"
        )
    lines.append(
        f"\nWorld seeds {', '.join(map(str, seeds))}; * marks a run not finished yet (its last round)."
    )
    return "\n".join(lines)


__all__ = ["METRICS", "Point", "draw_curves", "load_records", "series", "summary_table"]
