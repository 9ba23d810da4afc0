"""``illume eval``: evaluate a model (and optionally an adapter) on a VQA-X style data set.

Registered by ``illume.cli`` through ``add_eval_parser(sub)``. Heavy imports happen inside the verb.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_WORLD_SEED = 0
DEFAULT_BUILT_SIZE = 200


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model(model: str | None) -> Path:
    """The ``--model`` directory, or the packaged default model when none is given."""
    if model:
        return Path(model)
    from illume.models.default import packaged_model_dir

    packaged = packaged_model_dir()
    if packaged is None:
        raise SystemExit("error: --model is required (this checkout has no packaged default model)")
    return packaged


def load_items(
    data: str | None,
    split: str,
    size: int | None = None,
    seed: int = DEFAULT_WORLD_SEED,
    into: Path | None = None,
):
    """Items of ``split`` from a world directory or a VQA-X JSON file; without ``data``, a world
    split of ``size`` items built with a fixed seed into ``into`` (a new temporary directory if None)."""
    from illume.data import load_vqax

    if data is None:
        from illume.world import build_world

        out = into or Path(tempfile.mkdtemp(prefix="illume-eval-world-"))
        sizes = {s: 0 for s in ("train", "val", "test")}
        sizes[split] = size or DEFAULT_BUILT_SIZE
        print(f"building a {split} set of {sizes[split]} items (seed {seed}) in {out}", file=sys.stderr)
        return build_world(out, sizes=sizes, seed=seed)[split]
    path = Path(data)
    if path.is_dir():
        path = path / f"{split}.json"
    if not path.is_file():
        raise SystemExit(f"error: no data file {path}")
    return load_vqax(path)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate and print the table (or JSON)."""
    _offline()
    with tempfile.TemporaryDirectory(prefix="illume-eval-world-") as tmp:
        return _run_eval(args, load_items(args.data, args.split, args.limit, args.world_seed, Path(tmp)))


def _run_eval(args: argparse.Namespace, items) -> int:
    from illume.evaluation import evaluate
    from illume.loop import make_critic

    critics = [make_critic(name, args.rouge_threshold) for name in args.critic or ("rouge_l", "fact")]
    report = evaluate(
        resolve_model(args.model),
        items,
        adapter_dir=args.adapter,
        critics=critics,
        n=args.n,
        temperatures=tuple(args.temperature or (0.3, 0.9)),
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        condition_on=args.condition_on,
        max_new_tokens=args.max_new_tokens,
        meteor=not args.no_meteor,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report.to_dict(samples=args.samples), indent=1))
    else:
        print(report.format_table())
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="evaluate a model (and adapter): answer accuracy, caption scores, critic acceptance",
        description="Greedy answers -> answer accuracy; a greedy rationale per item -> BLEU/METEOR/"
        "ROUGE-L/CIDEr against the gold explanations; n sampled candidates -> acceptance per critic.",
    )
    p.add_argument("--model", help="local checkpoint directory (default: the packaged default model)")
    p.add_argument("--adapter", help="LoRA adapter directory to evaluate on top of the model")
    p.add_argument(
        "--data",
        help="a world directory (from build_world / python -m illume.world) or a VQA-X JSON file; "
        f"default: build a split with seed {DEFAULT_WORLD_SEED} into a temporary directory",
    )
    p.add_argument("--split", default="val", help="split name inside --data (default: val)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument(
        "--critic", action="append", choices=["rouge_l", "fact"], help="repeatable (default: both)"
    )
    p.add_argument("--rouge-threshold", type=float, default=0.7)
    p.add_argument("--n", type=int, default=10, help="sampled candidates per item (default 10)")
    p.add_argument("--temperature", type=float, action="append", help="repeatable (default 0.3 and 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=DEFAULT_WORLD_SEED, help="seed of a world built here")
    p.add_argument("--batch-size", type=int, default=8, help="items per generate call")
    p.add_argument(
        "--condition-on",
        choices=["gold", "model"],
        default="gold",
        help="which answer the rationales explain (default: gold)",
    )
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--samples", action="store_true", help="with --json: include per-item results")
    p.set_defaults(func=cmd_eval)
    return p
