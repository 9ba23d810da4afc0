"""``illume simulate``: a simulated critic drives ILLUME rounds through a running server's gRPC API.

Contract: a request-style verb (no config model; the server's own config decides how rounds
train). It connects like ``illume client`` with the admin role, builds a world under
``<data-dir>/world`` unless ``--world`` names one, judges ``--pool`` train questions per round with
the ``--critic`` (or, with ``--mislabel-training``, mislabels the training split as a drill for
the gate), starts each round and prints one table row per round (``illume.simulate``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from illume.cli.client import add_connection_flags, connect


def run(args: argparse.Namespace) -> int:
    from illume.data import load_vqax
    from illume.simulate import HEADER, Simulator, check_drill
    from illume.world import build_world

    check_drill(args.mislabel_training or "", args.select or "")  # before a world is built

    world = Path(args.world) if args.world else Path(args.data_dir) / "world"
    if not (world / "train.json").is_file():
        build_world(world, {"train": args.train, "val": args.val, "test": 0}, seed=args.seed)
    train, val = load_vqax(world / "train.json"), load_vqax(world / "val.json")[: args.val]
    with connect(args) as client:
        simulator = Simulator(
            client,
            critic=args.critic,
            n=args.n,
            namespace=args.namespace,
            select=args.select or "",
            traffic=args.traffic,
            sampling_seed=None if args.sampling_seed < 0 else args.sampling_seed,
            mislabel=args.mislabel_training or "",
        )
        print(HEADER)
        simulator.run(train, val, args.rounds, args.pool, seed=args.seed)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """play the human critic against a running server for K rounds"""
    add_connection_flags(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool", type=int, default=100, help="train items judged per round")
    p.add_argument("--train", type=int, default=2000, help="train pool size when the world is built here")
    p.add_argument("--val", type=int, default=100, help="val items measured after each round")
    p.add_argument("--world", default=None, help="a world directory from build_world (built when absent)")
    p.add_argument("--critic", choices=["fact", "rouge_l"], default="fact")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sampling-seed",
        type=int,
        default=0,
        help="seed of the judging requests' sampling, per item (negative: the server chooses, "
        "so runs differ)",
    )
    p.add_argument(
        "--select",
        choices=["active", "random"],
        default=None,
        help="judge --pool items per round handed out by the judging queue (NextItem) with this "
        "selection, out of --traffic x --pool generations logged per round (default: judge every "
        "generation)",
    )
    p.add_argument("--traffic", type=int, default=3, help="with --select: generations logged per judged item")
    p.add_argument(
        "--mislabel-training",
        choices=["one", "inverted", "wrong-answer"],
        default=None,
        help="a drill for the gate, on generations the server trains on: mark none of the candidates "
        "the critic accepts and the first (one) or every (inverted) one it rejects as fitting, or "
        "ask again with a wrong answer and mark every candidate fitting (wrong-answer); held-out "
        "ones are judged honestly, so the served gate should refuse the round",
    )
    p.set_defaults(func=run, role="admin")
