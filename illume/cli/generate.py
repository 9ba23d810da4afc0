"""``illume generate``: sample candidate rationales in this process and print them.

Contract: a request-style verb (no config model): ``--model`` (a local checkpoint), ``--image``,
``--question`` and optionally ``--answer``, ``--adapter`` and the sampling overrides of one request,
checked by the same ``RequestLimits`` the server applies; prints one line per candidate (or
``--json``). Nothing is fetched from a hub.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from illume.cli import offline

    offline()
    from illume.generation.generator import Generator
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


def configure(p: argparse.ArgumentParser) -> None:
    """sample candidate rationales in-process"""
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
    p.set_defaults(func=run)
