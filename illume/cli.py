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


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the whole server locally (Ray + Serve) until Ctrl-C."""
    _offline()
    from services.local import run_forever

    return run_forever(
        Path(args.data_dir),
        Path(args.model) if args.model else None,
        Path(args.config) if args.config else None,
        args.grpc_port,
        args.num_cpus,
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the server on this machine (local Ray cluster)")
    p.add_argument(
        "--data-dir", default=".data", help="feedback log, adapters and local keys (default .data)"
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--config", default=None, help="an AppConfig YAML file (the Serve application's args)")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    p.set_defaults(func=cmd_serve)


def _client(args: argparse.Namespace):
    from illume.client import IllumeClient

    key_file = args.api_key_file
    if key_file is None and not args.api_key:
        default = Path(args.data_dir) / "keys" / f"{args.role}.key"
        key_file = default if default.exists() else None
    credentials = None
    if getattr(args, "tls", False) or getattr(args, "ca_file", None):
        import grpc

        roots = Path(args.ca_file).read_bytes() if args.ca_file else None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return IllumeClient(args.target, api_key=args.api_key, api_key_file=key_file, credentials=credentials)


def _print_message(message) -> None:
    from google.protobuf import json_format

    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=1))


def cmd_client(args: argparse.Namespace) -> int:
    """Call the running server over gRPC."""
    import grpc

    try:
        with _client(args) as client:
            return _CLIENT_VERBS[args.client_verb](client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _client_generate(client, args: argparse.Namespace) -> int:
    reply = client.generate(
        Path(args.image).read_bytes(),
        args.question,
        args.answer,
        n=args.n,
        seed=args.seed,
        adapter=args.adapter,
        namespace=args.namespace,
        timeout=args.timeout,
    )
    if args.json:
        _print_message(reply)
        return 0
    origin = "model" if reply.answer_generated else "given"
    print(
        f"generation {reply.generation_id}  answer ({origin}): {reply.answer}"
        f"  adapter: {reply.adapter_version}"
        f"  seed: {reply.seed}"
    )
    for c in reply.candidates:
        print(f"[{c.candidate_id}] T={c.temperature:.2g} {c.text}")
    return 0


def _client_feedback(client, args: argparse.Namespace) -> int:
    reply = client.submit_feedback(
        args.generation,
        fitting=args.fit or (),
        none_fit=args.none_fit,
        skipped=args.skipped,
        answer_correct=args.answer_correct,
        corrected_rationale=args.corrected or "",
        idempotency_key=args.idempotency_key,
        namespace=args.namespace,
        timeout=args.timeout,
    )
    _print_message(reply)
    return 0


def _client_stats(client, args: argparse.Namespace) -> int:
    _print_message(client.stats(args.namespace, timeout=args.timeout))
    return 0


def _client_status(client, args: argparse.Namespace) -> int:
    _print_message(client.server_status(timeout=args.timeout))
    return 0


def _client_start_round(client, args: argparse.Namespace) -> int:
    _print_message(client.start_round(args.namespace, force=args.force, timeout=args.timeout))
    return 0


def _client_adapters(client, args: argparse.Namespace) -> int:
    _print_message(client.list_adapters(args.namespace, timeout=args.timeout))
    return 0


def _client_adapter(client, args: argparse.Namespace) -> int:
    _print_message(client.get_adapter(args.adapter, args.namespace, timeout=args.timeout))
    return 0


def _client_promote(client, args: argparse.Namespace) -> int:
    reply = client.promote(args.adapter, args.alias, args.namespace, args.canary_share, timeout=args.timeout)
    _print_message(reply)
    return 0


def _client_rollback(client, args: argparse.Namespace) -> int:
    _print_message(client.rollback(args.namespace, timeout=args.timeout))
    return 0


def _client_round(client, args: argparse.Namespace) -> int:
    _print_message(client.get_round(args.round_id, timeout=args.timeout))
    return 0


def _client_rounds(client, args: argparse.Namespace) -> int:
    _print_message(client.list_rounds(args.namespace, timeout=args.timeout))
    return 0


_CLIENT_VERBS = {
    "generate": _client_generate,
    "feedback": _client_feedback,
    "stats": _client_stats,
    "status": _client_status,
    "start-round": _client_start_round,
    "adapters": _client_adapters,
    "adapter": _client_adapter,
    "promote": _client_promote,
    "rollback": _client_rollback,
    "round": _client_round,
    "rounds": _client_rounds,
}
_CLIENT_ROLES = {
    "generate": "client",
    "feedback": "annotator",
    "stats": "annotator",
    "status": "client",
    "start-round": "admin",
    "adapters": "admin",
    "adapter": "admin",
    "promote": "admin",
    "rollback": "admin",
    "round": "admin",
    "rounds": "admin",
}


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="call a running server over gRPC")
    verbs = p.add_subparsers(dest="client_verb", required=True)
    for name in _CLIENT_VERBS:
        v = verbs.add_parser(name)
        v.add_argument("--target", default="127.0.0.1:50051", help="host:port of the gRPC endpoint")
        v.add_argument("--api-key", default=None, help="API key (or ILLUME_API_KEY, or --api-key-file)")
        v.add_argument("--api-key-file", default=None)
        v.add_argument("--data-dir", default=".data", help="where 'illume serve' keeps local keys")
        v.add_argument("--namespace", default="")
        v.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
        v.add_argument("--tls", action="store_true", help="connect over TLS (a gateway terminates it)")
        v.add_argument("--ca-file", default=None, help="PEM roots to trust for TLS (implies --tls)")
        v.set_defaults(func=cmd_client, role=_CLIENT_ROLES[name])
        if name == "generate":
            v.add_argument("--image", required=True)
            v.add_argument("--question", required=True)
            v.add_argument("--answer", default=None)
            v.add_argument("--n", type=int, default=0)
            v.add_argument("--seed", type=int, default=None)
            v.add_argument("--adapter", default="")
            v.add_argument("--json", action="store_true")
        elif name == "feedback":
            v.add_argument("--generation", required=True, help="generation id")
            v.add_argument("--fit", action="append", help="id of a fitting candidate (repeatable)")
            v.add_argument("--none-fit", action="store_true")
            v.add_argument("--skipped", action="store_true")
            v.add_argument("--answer-correct", type=lambda s: s.lower() in ("1", "yes", "true"), default=None)
            v.add_argument("--corrected", default=None, help="a corrected rationale")
            v.add_argument("--idempotency-key", default=None)
        elif name == "start-round":
            v.add_argument("--force", action="store_true")
        elif name in ("adapter", "promote"):
            v.add_argument("adapter", help="a version (7 or rationale-v7) or, for show, an alias")
            if name == "promote":
                v.add_argument("--alias", default="production", choices=["production", "canary"])
                v.add_argument("--canary-share", type=float, default=0.0)
        elif name == "round":
            v.add_argument("round_id")


# Verbs register in _verb_adders so each stays next to its own code.
def cmd_tune(args: argparse.Namespace) -> int:
    """Run one tuning round from a shell (the same body the LoopController submits as a job)."""
    _offline()
    from illume.store import AdapterRegistry
    from services.local import local_config
    from services.loop_controller import ACTIVE_STATES
    from services.tuner import run_round

    config = local_config(
        Path(args.data_dir),
        Path(args.model) if args.model else None,
        Path(args.config) if args.config else None,
    )
    registry = AdapterRegistry.open(config.feedback_log.store)
    namespace = args.namespace or "default"
    active, _ = registry.list_rounds(namespace, page_size=1, states=ACTIVE_STATES)
    if active:
        print(f"error: round {active[0].round_id} is still {active[0].state}", file=sys.stderr)
        return 2
    record = registry.create_round(namespace, "pending")
    final = run_round(config, namespace, record.round_id)
    print(
        json.dumps(
            {
                "round_id": final.round_id,
                "state": final.state,
                "reason": final.reason,
                "adapter_version": final.adapter_version,
                "scores": dict(final.scores),
            },
            indent=1,
        )
    )
    return 0 if final.state in ("promoted", "rejected") else 1


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="run one tuning round now (snapshot, Ray Train, gate, registry)")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--model", default=None)
    p.add_argument("--config", default=None, help="an AppConfig YAML file")
    p.add_argument("--namespace", default="default")
    p.set_defaults(func=cmd_tune)


def cmd_simulate(args: argparse.Namespace) -> int:
    """A simulated critic drives rounds through the public gRPC API of a running server."""
    from illume.data import load_vqax
    from illume.simulate import HEADER, Simulator
    from illume.world import build_world

    world = Path(args.world) if args.world else Path(args.data_dir) / "world"
    if not (world / "train.json").is_file():
        build_world(world, {"train": args.train, "val": args.val, "test": 0}, seed=args.seed)
    train, val = load_vqax(world / "train.json"), load_vqax(world / "val.json")[: args.val]
    args.role = "admin"
    with _client(args) as client:
        simulator = Simulator(client, critic=args.critic, n=args.n, namespace=args.namespace)
        print(HEADER)
        simulator.run(train, val, args.rounds, args.pool, seed=args.seed)
    return 0


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="play the human critic against a running server for K rounds")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--api-key", default=None)
    p.add_argument("--api-key-file", default=None)
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--namespace", default="")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool", type=int, default=100, help="train items judged per round")
    p.add_argument("--train", type=int, default=2000, help="train pool size when the world is built here")
    p.add_argument("--val", type=int, default=100, help="val items measured after each round")
    p.add_argument("--world", default=None, help="a world directory from build_world (built when absent)")
    p.add_argument("--critic", choices=["fact", "rouge_l"], default="fact")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca-file", default=None)
    p.set_defaults(func=cmd_simulate)


def _verb_adders() -> list[Callable[[argparse._SubParsersAction], None]]:
    from illume.evaluation_cli import add_eval_parser
    from illume.loop_cli import add_loop_parser

    return [
        _add_generate,
        _add_serve,
        _add_client,
        add_eval_parser,
        add_loop_parser,
        _add_tune,
        _add_simulate,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="illume", description="ILLUME model server and tools")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in _verb_adders():
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
