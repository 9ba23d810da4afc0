"""``illume study``: run the study's named runs, list the grid, draw its curves (docs/STUDY.md).

Contract:

- ``illume study run NAME...`` runs each named run in turn (``illume.study.runs``), skipping those
  whose record is finished and resuming interrupted ones from their last finished round (their work
  directory under ``--work`` must still be there); a progress bar counts runs and rounds; records
  go to ``--records`` (default ``docs/study/runs``);
- ``illume study list [--seeds ...]`` prints the planned grid with each run's state (finished,
  N rounds recorded, or not started);
- ``illume study report [--seeds ...]`` draws the curves into ``--out`` (PNG) and prints the
  summary table (mean and min-max over the seeds) as Markdown;
- ``--pool``, ``--train``, ``--val``, ``--test`` and ``--rounds`` change the study's sizes (a
  record keeps them; the unit tests use a tiny study).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DEFAULT_RECORDS = Path("docs/study/runs")
DEFAULT_WORK = Path(".study")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def study_config(args: argparse.Namespace):
    from illume.study import StudyConfig

    sizes = {
        "pool_size": args.pool,
        "world_train": args.train,
        "world_val": args.val,
        "world_test": args.test,
        "rounds": args.rounds,
    }
    return StudyConfig(**{k: v for k, v in sizes.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from illume.cli import offline, resolve_model

    offline()
    from tqdm import tqdm

    from illume.study import StudyContext, parse_run, run_study_run

    try:
        specs = [parse_run(name) for name in args.names]
    except ValueError as exc:
        print(f"illume study: {exc}", file=sys.stderr)
        return 2
    study = study_config(args)
    bar = tqdm(total=len(specs), unit="run", disable=args.no_progress, file=sys.stderr)
    ctx = StudyContext(
        model_dir=Path(resolve_model(args.model)),
        work=Path(args.work),
        records=Path(args.records),
        study=study,
        provenance={"git_commit": _git_commit(), "command": "illume study run " + " ".join(args.names)},
        progress=not args.no_progress,
        log=lambda line: bar.write(line, file=sys.stderr),
        shared_machine=args.shared_machine,
    )
    for spec in specs:
        bar.set_description(spec.name)
        run_study_run(spec, ctx)
        bar.update(1)
    bar.close()
    return 0


def list_grid(args: argparse.Namespace) -> int:
    from illume.study import study_grid
    from illume.study.runs import load_record

    for spec in study_grid(args.seeds, study_config(args)):
        record = load_record(Path(args.records) / f"{spec.name}.json")
        if record is None:
            state = "not started"
        elif record.get("finished"):
            state = f"finished ({len(record['rounds'])} rounds, {record['seconds']['total']:.0f} s)"
        else:
            state = f"{len(record['rounds'])} rounds recorded"
        print(f"{spec.name:32} {state}")
    return 0


def report(args: argparse.Namespace) -> int:
    from illume.study.report import draw_curves, load_records, summary_table

    records = load_records(Path(args.records), args.seeds)
    for path in draw_curves(records, Path(args.out), args.seeds):
        print(f"wrote {path}", file=sys.stderr)
    print(summary_table(records, args.seeds))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", default=str(DEFAULT_RECORDS), help="directory of the JSON records")
    p.add_argument("--pool", type=int, help="pool size (default: StudyConfig's)")
    p.add_argument("--train", type=int, help="train items per world")
    p.add_argument("--val", type=int, help="val items per world")
    p.add_argument("--test", type=int, help="test items per world")
    p.add_argument("--rounds", type=int, help="most ILLUME rounds per run")


def configure(p: argparse.ArgumentParser) -> None:
    """the ILLUME study: SFT on gold rationales against ILLUME rounds (docs/STUDY.md)"""
    verbs = p.add_subparsers(dest="verb", required=True)
    r = verbs.add_parser("run", help="run named runs (resumable)")
    r.add_argument("names", nargs="+", help="run names, e.g. sft-10-seed2 illume-paper-seed2 base-seed2")
    r.add_argument("--model", help="local base checkpoint (default: the packaged default model)")
    r.add_argument("--work", default=str(DEFAULT_WORK), help="worlds, adapters and snapshots")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--shared-machine", action="store_true", help="record that another run shared the machine")
    _common(r)
    r.set_defaults(func=run)
    ls = verbs.add_parser("list", help="the planned grid and each run's state")
    ls.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4])
    _common(ls)
    ls.set_defaults(func=list_grid)
    rep = verbs.add_parser("report", help="draw the curves and print the summary table")
    rep.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4])
    rep.add_argument("--out", default="docs/study", help="directory of the PNG files")
    _common(rep)
    rep.set_defaults(func=report)
