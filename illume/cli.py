"""The ``illume`` command line.

Each verb is a small function that parses its flags and calls the core (or, for the server verbs,
``services/``). Verbs that need heavy imports import them inside the function so ``illume --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Verb = Callable[[argparse.Namespace], int]


def _offline() -> None:
    # Nothing is ever fetched from a hub (models load from local directories only).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample candidate rationales in-process and print them."""
    _offline()
    from illume.generation import Generator
    from illume.models import ModelSettings, load_model
    from illume.validation import RequestLimits, build_generate_request, build_sampling

    limits = RequestLimits()
    sampling = build_sampling(
        limits,
        n=args.n,
        temperatures=args.temperature or (),
        top_k_fraction=args.top_k_fraction,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    request = build_generate_request(
        limits, Path(args.image).read_bytes(), args.question, args.answer, sampling
    )
    generator = Generator(load_model(ModelSettings(path=args.model, device=args.device)))
    if args.adapter:
        from peft import PeftModel

        generator.loaded.model = PeftModel.from_pretrained(
            generator.model, args.adapter, adapter_name="cli", is_trainable=False
        )
        request = request.__class__(**{**request.__dict__, "adapter": "cli"})
    result = generator.generate([request])[0]
    if args.json:
        print(
            json.dumps(
                {
                    "answer": result.answer,
                    "answer_generated": result.answer_generated,
                    "seed": result.seed,
                    "candidates": [c.__dict__ for c in result.candidates],
                },
                indent=1,
            )
        )
        return 0
    origin = "model" if result.answer_generated else "given"
    print(f"answer ({origin}): {result.answer}    seed: {result.seed}")
    for c in result.candidates:
        print(
            f"[{c.index}] T={c.temperature:g} tokens={c.token_count} {c.finish_reason:6s} "
            f"logp={c.mean_logprob:.3f}  {c.text}"
        )
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample candidate rationales in-process")
    p.add_argument("--model", required=True, help="local checkpoint directory")
    p.add_argument("--image", required=True, help="image file (JPEG, PNG or WebP)")
    p.add_argument("--question", required=True)
    p.add_argument("--answer", default=None, help="answer to rationalise; the model answers when absent")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory to apply")
    p.add_argument("--n", type=int, default=0, help="candidates (default 10)")
    p.add_argument("--temperature", type=float, action="append", help="repeatable (default 0.3 and 0.9)")
    p.add_argument("--top-k-fraction", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_generate)


# Later verbs register here: (adder, ...) so each stays next to its own code.
_VERB_ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_generate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="illume", description="ILLUME model server and tools")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in _VERB_ADDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from illume.errors import IllumeError

    try:
        return int(args.func(args) or 0)
    except IllumeError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
