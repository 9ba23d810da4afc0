"""``illume loop``: run ILLUME rounds in this process (sample, judge, snapshot, train, evaluate).

Registered by ``illume.cli`` through ``add_loop_parser(sub)``. Heavy imports happen inside the verb.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from illume.evaluation_cli import _offline, resolve_model


def cmd_loop(args: argparse.Namespace) -> int:
    _offline()
    from illume.data import load_vqax
    from illume.loop import LoopConfig, run_loop
    from illume.training import SnapshotConfig, TrainConfig

    out = Path(args.out or tempfile.mkdtemp(prefix="illume-loop-"))
    if args.data:
        data = Path(args.data)
        train, val = load_vqax(data / "train.json"), load_vqax(data / "val.json")
    else:
        from illume.world import build_world

        print(f"building a world (seed {args.world_seed}) in {out / 'world'}", file=sys.stderr)
        world = build_world(
            out / "world", sizes={"train": args.pool, "val": args.val_limit, "test": 0}, seed=args.world_seed
        )
        train, val = world["train"], world["val"]
    train_config = TrainConfig(
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha or 2 * args.lora_r,
        **({"lora_projections": tuple(args.lora_projections.split(","))} if args.lora_projections else {}),
        init_from=args.init,
        seed=args.seed,
        max_steps=args.max_steps,
        device=args.device,
    )
    config = LoopConfig(
        rounds=args.rounds,
        pool_size=args.pool,
        feedback_per_round=args.feedback_per_round,
        critic=args.critic,
        rouge_threshold=args.rouge_threshold,
        n=args.n,
        temperatures=tuple(args.temperature or (0.3, 0.9)),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        val_limit=args.val_limit,
        eval_n=args.eval_n or args.n,
        eval_baseline=not args.no_baseline,
        meteor=not args.no_meteor,
        seed=args.seed,
        snapshot=SnapshotConfig(
            replay_ratio=args.replay_ratio, replay_passes=args.replay_passes, seed=args.seed
        ),
        replay_pool=not args.no_replay_pool,
        train=train_config,
        device=args.device,
    )
    result = run_loop(
        resolve_model(args.model), train, val, config, out_dir=out, progress=not args.no_progress
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    print(f"loop finished in {result.seconds:.1f} s; artifacts in {out}", file=sys.stderr)
    return 0


def add_loop_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "loop",
        help="run ILLUME rounds in-process with a simulated critic (sample, judge, train, evaluate)",
    )
    p.add_argument("--model", help="local base checkpoint (default: the packaged default model)")
    p.add_argument("--data", help="a world directory with train.json and val.json (default: build one)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of a world built here")
    p.add_argument("--out", help="artifact directory (default: a new temporary directory)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool", type=int, default=200, help="training questions in the loop")
    p.add_argument("--feedback-per-round", type=int, help="most questions judged per round (default: pool)")
    p.add_argument("--critic", choices=["fact", "rouge_l"], default="fact", help="the simulated critic")
    p.add_argument("--rouge-threshold", type=float, default=0.7)
    p.add_argument("--n", type=int, default=10, help="candidates per question")
    p.add_argument("--temperature", type=float, action="append", help="repeatable (default 0.3 and 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument("--replay-ratio", type=float, default=10.0, help="answer rows per rationale row")
    p.add_argument(
        "--replay-passes",
        type=int,
        default=1,
        help="draw answer rows for this many epochs, each epoch its own questions (default 1: the "
        "same answer rows every epoch)",
    )
    p.add_argument(
        "--no-replay-pool",
        action="store_true",
        help="answer rows from judged questions only (default: topped up from the pool's other questions)",
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument(
        "--lr", type=float, default=1e-4, help="learning rate (the peak one with --lr-schedule linear)"
    )
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "linear"],
        default="constant",
        help="constant (the paper's) or linear decay to 0 over each round's steps",
    )
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, help="default: 2 x rank")
    p.add_argument(
        "--lora-projections",
        help="comma-separated projection names of the language model that get LoRA (default: "
        "q_proj,k_proj,v_proj,o_proj)",
    )
    p.add_argument("--init", choices=["base", "parent"], default="base", help="train each round from")
    p.add_argument("--val-limit", type=int, default=100, help="validation items per evaluation")
    p.add_argument("--eval-n", type=int, help="candidates per validation item (default: --n)")
    p.add_argument("--no-baseline", action="store_true", help="skip evaluating the base model first")
    p.add_argument("--no-meteor", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    p.set_defaults(func=cmd_loop)
    return p
