"""``illume loop``: ILLUME rounds in this process (sample, judge, snapshot, train, evaluate).

Contract: the settings flags are ``LoopConfig``'s fields (``FLAGS``: the spelling where it is not
the field's name, and the fields one flag sets together: ``--seed`` seeds the loop, the snapshot
and the training, ``--device`` places the sampling model and the training); ``--eval-n`` defaults
to ``--n`` and ``--lora-alpha`` to 2 x ``--lora-r``, as before. Fields without a flag
(``UNBOUND``) keep their defaults. ``--model`` (default: the packaged model), ``--data`` (a world
directory with train.json and val.json), ``--world-seed``, ``--out``, ``--no-progress`` and
``--json`` say what to run on and where the output goes; without ``--data`` a world of ``--pool``
train and ``--val-limit`` val items is built under ``--out`` (a new temporary directory when not
given). Writes ``run_loop``'s artifacts and prints its table (and ``--json``: the result).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from illume.cli.config_flags import Flag, train_flags

FLAGS = [
    Flag("rounds"),
    Flag("pool_size", "pool"),
    Flag("feedback_per_round"),
    Flag("resample_accepted"),
    Flag("stop_after_barren_rounds"),
    Flag("critic"),
    Flag("rouge_threshold"),
    Flag("n"),
    Flag("temperatures", "temperature"),
    Flag("top_k_fraction"),
    Flag("max_new_tokens"),
    Flag("batch_size"),
    Flag("val_limit"),
    Flag("eval_critics", "eval_critic"),
    Flag("eval_n", follows="n"),
    Flag("eval_baseline", "baseline"),
    Flag("meteor"),
    Flag("seed", also=("snapshot.seed", "train.seed")),
    Flag("snapshot.replay_ratio"),
    Flag("snapshot.replay_passes"),
    Flag("snapshot.replay_explained"),
    Flag("snapshot.max_rationales_per_question"),
    Flag("replay_pool"),
    *train_flags("train"),
    Flag("device", also=("train.device",)),
]
# LoopConfig fields no flag sets (the defaults are the paper's or follow the model).
# The simulated loop has one critic and no people: the rating rule and annotator reliability of
# the snapshot (SnapshotConfig.acceptance, .reliability) keep their defaults.
UNBOUND = (
    "train.betas",
    "train.dtype",
    "train.image_backend",
    *(
        f"snapshot.acceptance.{name}"
        for name in (
            "min_fitting_rating",
            "rating_weights",
            "unrated_weight",
            "train_corrected",
            "corrected_weight",
        )
    ),
    *(
        f"snapshot.reliability.{name}"
        for name in (
            "exclude_flagged",
            "min_overlap_items",
            "flag_below_kappa",
            "min_annotators",
            "max_share_of_rationale_rows",
        )
    ),
)
# Validation items of a world built here when --val-limit is None (all).
DEFAULT_BUILT_VAL = 100


def run(args: argparse.Namespace) -> int:
    from illume.cli import offline, resolve_model

    offline()
    from illume.data import load_vqax
    from illume.training.loop import run_loop

    config = args.build_config(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="illume-loop-"))
    if args.data:
        data = Path(args.data)
        train, val = load_vqax(data / "train.json"), load_vqax(data / "val.json")
    else:
        from illume.world import build_world

        print(f"building a world (seed {args.world_seed}) in {out / 'world'}", file=sys.stderr)
        sizes = {"train": config.pool_size, "val": config.val_limit or DEFAULT_BUILT_VAL, "test": 0}
        world = build_world(out / "world", sizes=sizes, seed=args.world_seed)
        train, val = world["train"], world["val"]
    result = run_loop(
        resolve_model(args.model), train, val, config, out_dir=out, progress=not args.no_progress
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    print(f"loop finished in {result.seconds:.1f} s; artifacts in {out}", file=sys.stderr)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """run ILLUME rounds in-process with a simulated critic (sample, judge, train, evaluate)"""
    from illume.cli.config_flags import ConfigFlags
    from illume.training.loop import LoopConfig

    p.add_argument("--model", help="local base checkpoint (default: the packaged default model)")
    p.add_argument("--data", help="a world directory with train.json and val.json (default: build one)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of a world built here")
    p.add_argument("--out", help="artifact directory (default: a new temporary directory)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    flags = ConfigFlags(LoopConfig, FLAGS)
    flags.add_to(p, "loop settings (LoopConfig)")
    p.set_defaults(func=run, config_flags=flags, build_config=flags.build)
