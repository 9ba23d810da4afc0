"""``python -m illume.models.default_build``: build, export and measure the default model.

    python -m illume.models.default_build --out illume/default_model --work build/default-model

Trains from scratch (resuming from ``--work/checkpoint.pt`` when present), measures the result on
the evaluation world's val split, and writes the checkpoint with its manifest to ``--out``.
``--measure-only`` re-measures an existing checkpoint and prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m illume.models.default_build", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("illume/default_model"))
    parser.add_argument("--work", type=Path, default=Path("build/default-model"))
    parser.add_argument("--val-items", type=int, default=200, help="val items measured for the manifest")
    parser.add_argument("--measure-only", action="store_true", help="only measure the checkpoint in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (part of the build config)")
    args = parser.parse_args(argv)

    from illume.models.default_build.build import BuildConfig, train
    from illume.models.default_build.export import export
    from illume.models.default_build.measure import measure, world_split

    torch.set_num_threads(args.threads)
    items = world_split("val", args.val_items)
    if args.measure_only:
        print(json.dumps(measure(args.out, items), indent=1))
        return 0

    config = BuildConfig(threads=args.threads)
    started = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {line}", flush=True)

    model, tokenizer, records = train(config, args.work, log=log)
    train_seconds = records["seconds"]
    staging = args.work / "export"
    export(model, tokenizer, config, staging, command="", metrics={}, build_seconds=train_seconds)
    log("measuring on val")
    figures = measure(staging, items)
    figures.pop("examples", None)
    metrics = {"val": figures, "training": records["stages"]}
    command = "make default-model  # python -m illume.models.default_build " + shlex.join(sys.argv[1:])
    export(
        model.float(),
        tokenizer,
        config,
        args.out,
        command=command,
        metrics=metrics,
        build_seconds=train_seconds,
    )
    log(f"wrote {args.out}: {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
