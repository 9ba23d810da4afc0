"""The generation engine served: candidates/s through the real gRPC path against in-process, and the
time to the first streamed candidate, on the LLaVA-1.5-shaped model of ``tests.bench.engine``.

    python -m tests.bench.engine_served                  # levels 1 8 32, three runs each (time-capped)
    python -m tests.bench.engine_served --levels 1 --runs 1 --skip-mixed   # a quick check

Each level is a burst of that many concurrent requests (n = 10 candidates over temperatures 0.3
and 0.9, exactly ``--tokens`` new tokens each, a given answer), the same requests in both places:
- in-process: ``Generator(engine="fork")`` generating the burst as one batch, no Ray, no server,
  measured first, before Ray starts;
- served: client threads on 127.0.0.1 each open a GenerateStream (one channel, as a load generator
  keeps) -> Serve gRPC proxy -> Ingress -> Generator (the default engine, the fork for LLaVA), max
  batch 32, ``--batch-wait`` seconds for a batch to fill, replica ``num_cpus`` 2 (2 torch threads).
  Candidates/s counts from the first request sent to the last candidate received; the time to the
  header, to the first and to the last candidate are per request (medians over the burst).
Figures are the median of ``--runs`` runs. The served candidates are also compared with the
in-process ones (same seeds, same pixels through PNG): on CPU in fp32 a request's candidates are
the same set whatever the batch (up to last-bit differences).

Then the mixed burst (``--mixed-level`` requests, half with ``--short-tokens`` new tokens and half
with ``--tokens``, one batch): the short requests' time to their first streamed candidate against
the same burst's Generate latency (unary: a reply leaves when its batch ends), which is what
streaming buys a client whose rows end early.

A time cap (``--time-cap``, default ``$ILLUME_BENCH_SERVED_CAP_S`` or 960 s) bounds the whole run:
a level runs as many of its runs as fit, estimated from the level below (linear in the burst).
Figures, not assertions; they go to docs/BENCHMARKS.md ("Generation engine served").
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.bench.engine import SHAPES, Budget, build_checkpoint, make_requests, noise_image

DEFAULT_CAP_S = 960.0  # with engine.py (780 s) the LLaVA-1.5-shaped benches stay under 30 min
CAP_ENV = "ILLUME_BENCH_SERVED_CAP_S"
TARGET = 0.9  # served >= 0.9x in-process at concurrency 32 (issue 22)
KEY = "bench-key-0123456789"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Level:
    """One burst size: per run, in-process and served figures."""

    level: int
    in_process: list[float] = field(default_factory=list)  # cand/s
    served: list[float] = field(default_factory=list)  # cand/s
    header_s: list[float] = field(default_factory=list)  # per run: median over the burst
    first_s: list[float] = field(default_factory=list)
    last_s: list[float] = field(default_factory=list)
    same: tuple[int, int] = (0, 0)
    reference: list[Counter] = field(default_factory=list)  # in-process candidate texts per request

    @staticmethod
    def median(values: Sequence[float]) -> float | None:
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        served, inproc = self.median(self.served), self.median(self.in_process)
        return served / inproc if served and inproc else None


@dataclass
class Streamed:
    """One streamed request, seen by the client."""

    header_s: float
    first_s: float
    last_s: float
    texts: list[str]


def request_args(i: int, args: argparse.Namespace, tokens: int) -> tuple[tuple[str, str], dict]:
    """Request ``i`` of a burst as ``tests.bench.engine.make_requests`` builds it in-process (same
    question, answer and seed), as the client's (question, answer) and keyword arguments."""
    return (f"what colour is the square w{i}?", "red"), {
        "n": args.n,
        "temperatures": args.temperatures,
        "max_new_tokens": tokens,
        "min_new_tokens": tokens,
        "seed": 1000 + i,
        "ephemeral": True,
        "timeout": 3600,
    }


def stream_one(client, image: bytes, i: int, args: argparse.Namespace, tokens: int) -> Streamed:
    started = time.perf_counter()
    header = first = last = 0.0
    texts: list[str] = []
    positional, options = request_args(i, args, tokens)
    for message in client.generate_stream(image, *positional, **options):
        now = time.perf_counter() - started
        if message.WhichOneof("item") == "header":
            header = now
        else:
            first = first or now
            last = now
            texts.append(message.candidate.text)
    return Streamed(header, first, last, texts)


def unary_one(client, image: bytes, i: int, args: argparse.Namespace, tokens: int) -> float:
    started = time.perf_counter()
    positional, options = request_args(i, args, tokens)
    client.generate(image, *positional, **options)
    return time.perf_counter() - started


def burst(pool: ThreadPoolExecutor, fn, images: Sequence[bytes], tokens: Sequence[int]) -> tuple[list, float]:
    """Send every request at once from its own thread; (results, seconds to the last reply)."""
    started = time.perf_counter()
    futures = [pool.submit(fn, images[i], i, tokens[i]) for i in range(len(images))]
    results = [f.result() for f in futures]
    return results, time.perf_counter() - started


def in_process_levels(model_dir: Path, levels: Sequence[int], args, budget: Budget) -> dict[int, Level]:
    from illume.generation.generator import Generator
    from illume.models import ModelSettings, load_model

    torch.set_num_threads(2)
    generator = Generator(
        load_model(ModelSettings(path=model_dir, device="cpu", image_backend="pil")), engine="fork"
    )
    shape = SHAPES[args.size]
    generator.generate(make_requests(1, "given", args.n, args.tokens, args.temperatures, shape.image))
    out: dict[int, Level] = {}
    per_request_s = None
    for level in sorted(levels):
        cell = Level(level)
        for run in range(args.runs):
            # Each in-process run is followed later by a served run of about the same length.
            need = 2 * per_request_s * level if per_request_s else 0.0
            if budget.left() < need:
                what = "skipped" if run == 0 else f"{run} of {args.runs} runs"
                print(
                    f"NOTE: level {level} {what}: a run here and served takes about {need:.0f} s, "
                    f"{max(0.0, budget.left()):.0f} s of the cap left (raise --time-cap or {CAP_ENV})",
                    flush=True,
                )
                break
            requests = make_requests(level, "given", args.n, args.tokens, args.temperatures, shape.image)
            t = time.perf_counter()
            replies = generator.generate(requests)
            seconds = time.perf_counter() - t
            per_request_s = seconds / level
            cell.in_process.append(sum(len(r.candidates) for r in replies) / seconds)
            out[level] = cell
            if run == 0:
                cell.reference = [Counter(c.text for c in r.candidates) for r in replies]
            print(
                f"  in-process {level}: run {run + 1}, {seconds:.1f} s, {cell.in_process[-1]:.2f} cand/s",
                flush=True,
            )
    del generator
    return out


def start_server(model_dir: Path, data: Path, args) -> int:
    from illume.models.loading import ModelSettings
    from illume.store.settings import StoreSettings
    from services.auth import key_sha256
    from services.config import ApiKey, AppConfig, AuthSettings, FeedbackLogSettings, GeneratorSettings
    from services.local import start
    from tests.conftest import free_port

    config = AppConfig(
        generator=GeneratorSettings(
            model=ModelSettings(path=model_dir, image_backend="pil"),
            max_batch_size=32,
            batch_wait_timeout_s=args.batch_wait,
            num_cpus=2,
        ),
        feedback_log=FeedbackLogSettings(store=StoreSettings(url=f"sqlite:///{data / 'feedback.db'}")),
        auth=AuthSettings(keys=[ApiKey(sha256=key_sha256(KEY), role="admin", principal="bench")]),
    )
    port = free_port()
    start(config, port, 8, dashboard=False)  # as `illume serve` starts it (8 logical CPUs)
    return port


def served_levels(port: int, cells: dict[int, Level], args, budget: Budget) -> None:
    from illume.client import IllumeClient

    shape = SHAPES[args.size]
    client = IllumeClient(f"127.0.0.1:{port}", api_key=KEY)
    with ThreadPoolExecutor(max(cells) + 1) as pool:

        def one(image: bytes, i: int, tokens: int) -> Streamed:
            return stream_one(client, image, i, args, tokens)

        burst(pool, one, [png(noise_image(0, shape.image))], [args.tokens])  # warm-up
        for level, cell in sorted(cells.items()):
            images = [png(noise_image(i, shape.image)) for i in range(level)]
            runs = len(cell.in_process)
            for run in range(runs):
                expected = level / max(cell.in_process) * args.n if cell.in_process else 0
                if run > 0 and budget.left() < expected:
                    print(f"NOTE: served level {level}: {run} of {runs} runs (cap)", flush=True)
                    break
                results, seconds = burst(pool, one, images, [args.tokens] * level)
                candidates = sum(len(r.texts) for r in results)
                cell.served.append(candidates / seconds)
                cell.header_s.append(statistics.median(r.header_s for r in results))
                cell.first_s.append(statistics.median(r.first_s for r in results))
                cell.last_s.append(statistics.median(r.last_s for r in results))
                if run == 0 and cell.reference:
                    same = sum(
                        sum((Counter(r.texts) & ref).values())
                        for r, ref in zip(results, cell.reference, strict=True)
                    )
                    cell.same = (same, sum(sum(ref.values()) for ref in cell.reference))
                print(
                    f"  served {level}: run {run + 1}, {seconds:.1f} s, {cell.served[-1]:.2f} cand/s, "
                    f"median header {cell.header_s[-1]:.2f} s / first {cell.first_s[-1]:.2f} s / "
                    f"last {cell.last_s[-1]:.2f} s",
                    flush=True,
                )
        if not args.skip_mixed:
            mixed(pool, client, args)
    client.close()


def mixed(pool: ThreadPoolExecutor, client, args) -> None:
    shape = SHAPES[args.size]
    level = args.mixed_level
    images = [png(noise_image(100 + i, shape.image)) for i in range(level)]
    tokens = [args.short_tokens if i % 2 == 0 else args.tokens for i in range(level)]
    streamed, _ = burst(pool, lambda image, i, t: stream_one(client, image, i, args, t), images, tokens)
    unary, _ = burst(pool, lambda image, i, t: unary_one(client, image, i, args, t), images, tokens)
    short = [i for i in range(level) if tokens[i] == args.short_tokens]
    long = [i for i in range(level) if tokens[i] != args.short_tokens]
    print(f"\nMixed burst of {level} ({args.short_tokens} and {args.tokens} new tokens, one batch):")
    print(
        "| requests | GenerateStream first candidate s | GenerateStream last candidate s | Generate reply s |"
    )
    print("|---|---|---|---|")
    for name, group in ((f"{args.short_tokens} tokens", short), (f"{args.tokens} tokens", long)):
        print(
            f"| {name} | {statistics.median(streamed[i].first_s for i in group):.2f} "
            f"| {statistics.median(streamed[i].last_s for i in group):.2f} "
            f"| {statistics.median(unary[i] for i in group):.2f} |"
        )


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(cells: dict[int, Level]) -> None:
    print(
        "\n| concurrency | runs | in-process cand/s | served cand/s | served / in-process "
        "| header s | first candidate s | last candidate s | served = in-process candidates |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for level, c in sorted(cells.items()):
        ratio = c.ratio()
        print(
            f"| {level} | {min(len(c.in_process), len(c.served))} | {_fmt(c.median(c.in_process))} "
            f"| {_fmt(c.median(c.served))} | {_fmt(ratio)}{'x' if ratio else ''} "
            f"| {_fmt(c.median(c.header_s))} | {_fmt(c.median(c.first_s))} | {_fmt(c.median(c.last_s))} "
            f"| {c.same[0]}/{c.same[1]} |"
        )
    cell = cells.get(32)
    ratio = cell.ratio() if cell else None
    verdict = "not measured" if ratio is None else ("met" if ratio >= TARGET else "NOT met")
    print(f"\nTarget: served >= {TARGET}x in-process at concurrency 32: {_fmt(ratio)} -> {verdict}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["150m", "tiny"], default="150m")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.9])
    parser.add_argument("--batch-wait", type=float, default=0.2, help="the server's batch_wait_timeout_s")
    parser.add_argument("--mixed-level", type=int, default=8)
    parser.add_argument("--short-tokens", type=int, default=6)
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--time-cap", type=float, default=float(os.environ.get(CAP_ENV, DEFAULT_CAP_S)))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    budget = Budget(args.time_cap, started)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="illume-engine-served-") as tmp:
        model_dir = build_checkpoint(Path(tmp) / "llava", SHAPES[args.size])
        print(
            f"model: random LLaVA {args.size} ({SHAPES[args.size].image_tokens} image tokens), "
            f"n = {args.n}, {args.tokens} new tokens, levels {args.levels}, {args.runs} run(s), "
            f"batch wait {args.batch_wait} s, cap {args.time_cap:.0f} s",
            flush=True,
        )
        cells = in_process_levels(model_dir, args.levels, args, budget)
        import ray
        from ray import serve

        port = start_server(model_dir, Path(tmp), args)
        try:
            served_levels(port, cells, args, budget)
        finally:
            serve.shutdown()
            ray.shutdown()
    print_table(cells)
    print(f"\nwhole bench {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
