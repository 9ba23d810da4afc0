"""``illume client ...``: call a running server over gRPC, one sub-verb per call.

Contract: request-style verbs (no config model). Every sub-verb takes the connection flags
(``--target``, ``--api-key`` / ``--api-key-file``, ``--data-dir``, ``--namespace``, ``--timeout``,
``--tls``, ``--ca-file``); without a key, the key of the sub-verb's role under
``<data-dir>/keys/`` (written by ``illume serve``) is used when it exists. Replies print as JSON
(``generate`` prints a table unless ``--json``); a gRPC error prints ``error: CODE: details``
and exits 1. ``connect(args)`` is shared with ``illume simulate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from illume.adapters import ALIASES, PRODUCTION


def connect(args: argparse.Namespace):
    """An ``IllumeClient`` from the connection flags (and ``args.role`` for the default key)."""
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


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the gRPC endpoint")
    p.add_argument("--api-key", default=None, help="API key (or ILLUME_API_KEY, or --api-key-file)")
    p.add_argument("--api-key-file", default=None)
    p.add_argument("--data-dir", default=".data", help="where 'illume serve' keeps local keys")
    p.add_argument("--namespace", default="")
    p.add_argument("--tls", action="store_true", help="connect over TLS (a gateway terminates it)")
    p.add_argument("--ca-file", default=None, help="PEM roots to trust for TLS (implies --tls)")


def _print_message(message) -> None:
    from google.protobuf import json_format

    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=1))


def run(args: argparse.Namespace) -> int:
    import grpc

    try:
        with connect(args) as client:
            return VERBS[args.client_verb][0](client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _generate(client, args: argparse.Namespace) -> int:
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


def _feedback(client, args: argparse.Namespace) -> int:
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


POOL_BATCH = 100


def pool_items_of(path: Path, image_dir: str | None, limit: int) -> list:
    """The VQA-X items of a JSON file, or of a VQA-X directory's split files (``*.json`` named for
    train, val or test: ``vqaX_val.json``, ``val.json``), their images in ``images/`` beside them
    unless ``image_dir``."""
    from illume.data.vqax import load_vqax

    splits = ("train", "val", "test")
    if path.is_dir():
        files = sorted(f for f in path.glob("*.json") if any(split in f.stem for split in splits))
    else:
        files = [path]
    items = [item for f in files for item in load_vqax(f, image_dir)]
    return items[:limit] if limit else items


def _add_pool(client, args: argparse.Namespace) -> int:
    """Upload VQA-X items (image, question, majority answer unless --no-answer) to the namespace's
    judging pool, in batches of POOL_BATCH."""
    items = pool_items_of(Path(args.vqax), args.image_dir, args.limit)
    added = present = pending = 0
    for start in range(0, len(items), POOL_BATCH):
        batch = [
            (item.image_path.read_bytes(), item.question, "" if args.no_answer else item.answer)
            for item in items[start : start + POOL_BATCH]
        ]
        reply = client.add_pool_items(batch, namespace=args.namespace, timeout=args.timeout)
        added, present, pending = added + reply.added, present + reply.already_present, reply.pending
    print(f"added {added}, already present {present}; {pending} pool items wait to be judged")
    return 0


def _printing(call):
    def verb(client, args: argparse.Namespace) -> int:
        _print_message(call(client, args))
        return 0

    return verb


# name -> (call, role whose local key is used by default)
VERBS = {
    "generate": (_generate, "client"),
    "feedback": (_feedback, "annotator"),
    "stats": (_printing(lambda c, a: c.stats(a.namespace, timeout=a.timeout)), "annotator"),
    "status": (_printing(lambda c, a: c.server_status(timeout=a.timeout)), "client"),
    "start-round": (
        _printing(lambda c, a: c.start_round(a.namespace, force=a.force, timeout=a.timeout)),
        "admin",
    ),
    "adapters": (_printing(lambda c, a: c.list_adapters(a.namespace, timeout=a.timeout)), "admin"),
    "adapter": (_printing(lambda c, a: c.get_adapter(a.adapter, a.namespace, timeout=a.timeout)), "admin"),
    "promote": (
        _printing(lambda c, a: c.promote(a.adapter, a.alias, a.namespace, a.canary_share, timeout=a.timeout)),
        "admin",
    ),
    "rollback": (_printing(lambda c, a: c.rollback(a.namespace, timeout=a.timeout)), "admin"),
    "round": (_printing(lambda c, a: c.get_round(a.round_id, timeout=a.timeout)), "admin"),
    "rounds": (_printing(lambda c, a: c.list_rounds(a.namespace, timeout=a.timeout)), "admin"),
    "namespaces": (_printing(lambda c, a: c.list_namespaces(timeout=a.timeout)), "client"),
    "declare-namespace": (
        _printing(lambda c, a: c.declare_namespace(a.name, timeout=a.timeout)),
        "admin",
    ),
    "audit": (
        _printing(lambda c, a: c.list_audit_events(a.namespace, page_size=a.limit, timeout=a.timeout)),
        "admin",
    ),
    "annotators": (_printing(lambda c, a: c.list_annotators(a.namespace, timeout=a.timeout)), "admin"),
    "whoami": (_printing(lambda c, a: c.who_am_i(timeout=a.timeout)), "client"),
    "next-item": (_printing(lambda c, a: c.next_item(a.namespace, timeout=a.timeout)), "annotator"),
    "add-pool": (_add_pool, "admin"),
    "clear-annotator-flag": (
        _printing(lambda c, a: c.clear_annotator_flag(a.namespace, a.annotator_id, timeout=a.timeout)),
        "admin",
    ),
}


def configure(p: argparse.ArgumentParser) -> None:
    """call a running server over gRPC"""
    verbs = p.add_subparsers(dest="client_verb", required=True)
    for name, (_, role) in VERBS.items():
        v = verbs.add_parser(name)
        add_connection_flags(v)
        v.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
        v.set_defaults(func=run, role=role)
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
                v.add_argument("--alias", default=PRODUCTION, choices=ALIASES)
                v.add_argument("--canary-share", type=float, default=0.0)
        elif name == "round":
            v.add_argument("round_id")
        elif name == "declare-namespace":
            v.add_argument("name", help="the namespace to declare")
        elif name == "audit":
            v.add_argument("--limit", type=int, default=20, help="events to show (1-100), newest first")
        elif name == "add-pool":
            v.add_argument(
                "--vqax", required=True, help="a VQA-X JSON file, or a directory of them (images/ beside)"
            )
            v.add_argument(
                "--image-dir", default=None, help="where its images are (default: images/ beside it)"
            )
            v.add_argument("--limit", type=int, default=0, help="upload only the first N items")
            v.add_argument("--no-answer", action="store_true", help="let the model answer")
        elif name == "clear-annotator-flag":
            v.add_argument("annotator_id", help="the flagged annotator (see 'illume client annotators')")
