"""``illume eval``: evaluate a model (and optionally an adapter) on a VQA-X style data set.

Contract: the settings flags are the fields of ``EvalSettings`` (``FLAGS``): ``evaluate()``'s
keyword settings under the same names and defaults (a unit test keeps them equal) plus the critics
that judge the candidates. ``--model`` (default: the packaged model), ``--adapter``, ``--data`` (a
world directory or a VQA-X JSON file), ``--split``, ``--world-seed``, ``--json``, ``--samples`` and
``--no-progress`` say what to evaluate and how to print it. Without ``--data`` a world split of
``--limit`` items (200 when there is no limit) is built with seed ``--world-seed`` into a temporary
directory that is removed afterwards. Prints the report's table, or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from illume.cli.config_flags import ConfigFlags, Flag
from illume.training.loop import CriticName

DEFAULT_WORLD_SEED = 0
DEFAULT_BUILT_SIZE = 200


class EvalSettings(BaseModel):
    """How ``illume eval`` evaluates: ``evaluate()``'s settings and the critics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    critics: tuple[CriticName, ...] = Field(
        ("rouge_l", "fact"), description="Critics that judge the sampled candidates."
    )
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Acceptance threshold of the rouge_l critic.")
    n: int = Field(10, ge=1, description="Sampled candidates per item.")
    temperatures: tuple[float, ...] = Field((0.3, 0.9), description="Sampling temperatures (the paper's).")
    top_k_fraction: float = Field(0.1, gt=0, le=1, description="Top-k share of the vocabulary.")
    max_new_tokens: int = Field(100, ge=1, description="Longest rationale, in tokens.")
    seed: int = Field(0, description="Sampling seed (per item, derived from the question id).")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N items (None: all).")
    batch_size: int = Field(8, ge=1, description="Items per generate call.")
    condition_on: Literal["gold", "model"] = Field(
        "gold", description="Which answer the rationales explain: the gold one or the model's own."
    )
    meteor: bool = Field(True, description="Compute METEOR (Java).")
    tokenize: bool = Field(
        True,
        description="PTB-tokenise before scoring (Java, as the reference evaluation); else split on spaces.",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")


FLAGS = [
    Flag("critics", "critic"),
    Flag("rouge_threshold"),
    Flag("n"),
    Flag("temperatures", "temperature"),
    Flag("top_k_fraction"),
    Flag("max_new_tokens"),
    Flag("seed"),
    Flag("limit"),
    Flag("batch_size"),
    Flag("condition_on"),
    Flag("meteor"),
    Flag("tokenize"),
    Flag("device"),
]


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


def run(args: argparse.Namespace) -> int:
    from illume.cli import offline, resolve_model

    offline()
    from illume.critics import make_critic
    from illume.evaluation.evaluate import evaluate

    settings: EvalSettings = args.build_config(args)
    with tempfile.TemporaryDirectory(prefix="illume-eval-world-") as tmp:
        items = load_items(args.data, args.split, settings.limit, args.world_seed, Path(tmp))
        report = evaluate(
            resolve_model(args.model),
            items,
            adapter_dir=args.adapter,
            critics=[make_critic(name, settings.rouge_threshold) for name in settings.critics],
            progress=not args.no_progress,
            **settings.model_dump(exclude={"critics", "rouge_threshold"}),
        )
    if args.json:
        print(json.dumps(report.to_dict(samples=args.samples), indent=1))
    else:
        print(report.format_table())
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """evaluate a model (and adapter): answer accuracy, caption scores, critic acceptance"""
    p.description = (
        "Greedy answers -> answer accuracy; a greedy rationale per item -> BLEU/METEOR/ROUGE-L/CIDEr "
        "against the gold explanations; n sampled candidates -> acceptance per critic."
    )
    p.add_argument("--model", help="local checkpoint directory (default: the packaged default model)")
    p.add_argument("--adapter", help="LoRA adapter directory to evaluate on top of the model")
    p.add_argument(
        "--data",
        help="a world directory (from build_world / python -m illume.world) or a VQA-X JSON file; "
        f"default: build a split with seed {DEFAULT_WORLD_SEED} into a temporary directory",
    )
    p.add_argument("--split", default="val", help="split name inside --data (default: val)")
    p.add_argument("--world-seed", type=int, default=DEFAULT_WORLD_SEED, help="seed of a world built here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--samples", action="store_true", help="with --json: include per-item results")
    flags = ConfigFlags(EvalSettings, FLAGS)
    flags.add_to(p, "evaluation settings")
    p.set_defaults(func=run, config_flags=flags, build_config=flags.build)
