"""Is the world learnable for this model? Supervised LoRA fine-tuning on gold train rationales.

    python -m illume.models.default_build.sft_gold --model illume/default_model --train 200 --val 100

Contract: builds the evaluation world (seed 0; ``--train`` train items, ``--val`` val items) into
``--out``, turns every gold rationale of every train item into an accepted rationale
(``JudgedItem(accepted=golds)``), builds a snapshot (``illume.training.build_snapshot``, with
``--replay-ratio`` answer rows per rationale row) and trains one LoRA adapter on it with
``illume.training.train_round``, then evaluates base and adapter with ``illume.evaluation.evaluate.evaluate``
(fact critic; greedy rationale acceptance, sampled acceptance, answer accuracy) and prints both
as JSON. Uses only the public APIs of the training and evaluation modules.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m illume.models.default_build.sft_gold")
    parser.add_argument("--model", default="illume/default_model")
    parser.add_argument("--out", default=None)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--replay-ratio", type=float, default=1.0)
    parser.add_argument(
        "--lora-projections",
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated projection names of the language model that get LoRA",
    )
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args(argv)

    import torch

    from illume.critics import FactCritic
    from illume.evaluation.evaluate import evaluate_generator, load_generator
    from illume.training import SnapshotConfig, TrainConfig, build_snapshot, train_round
    from illume.training.snapshot import JudgedItem
    from illume.world import build_world

    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="illume-sft-gold-"))
    world = build_world(out / "world", sizes={"train": args.train, "val": args.val, "test": 0}, seed=0)
    judged = [
        JudgedItem(
            item_id=item.question_id,
            image=str(item.image_path),
            question=item.question,
            answer=item.answers[0],
            accepted=tuple(item.explanations),
            answer_correct=True,
        )
        for item in world["train"]
    ]
    snapshot = build_snapshot(judged, SnapshotConfig(replay_ratio=args.replay_ratio, seed=0))
    config = TrainConfig(
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_projections=tuple(args.lora_projections.split(",")),
        device="cpu",
    )
    result = train_round(snapshot, config, model_dir=args.model, out_dir=out / "adapter")
    figures = {}
    for name, adapter in (("base", None), ("sft_gold", result.adapter_dir)):
        # The adapter is installed under its own name ("eval" clashes with nn.Module.eval in peft).
        generator, installed = load_generator(args.model, adapter, "cpu", adapter_name="sft-gold")
        report = evaluate_generator(
            generator,
            world["val"],
            adapter=installed,
            critics=[FactCritic()],
            n=args.n,
            progress=False,
            meteor=False,
        )
        data = report.to_dict()
        figures[name] = {"overall": data["overall"], "per_family": data["per_family"]}
    print(json.dumps({"out": str(out), "rows": len(snapshot.rows), "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
