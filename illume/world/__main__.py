"""``python -m illume.world --out DIR --train N --val M --test K --seed S``: build the world on disk."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from illume.world.build import build_world


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m illume.world", description="Build the synthetic world.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = build_world(args.out, {"train": args.train, "val": args.val, "test": args.test}, seed=args.seed)
    sizes = ", ".join(f"{split}={len(items)}" for split, items in written.items())
    print(f"wrote {sizes} to {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
