"""Generation engine benchmark: one prefill per request (fork) against repeated rows, in-process.

    python -m tests.bench.engine                      # the full run (time-capped, see --time-cap)
    python -m tests.bench.engine --smoke              # concurrency 1, one run: a quick check
    ILLUME_BENCH_ENGINE_CAP_S=3600 python -m tests.bench.engine   # a longer cap on a quiet machine

A LLaVA-1.5-shaped random model (336-pixel images, 576 image tokens, a CLIP-ViT-shaped vision
tower at patch 14 and a small Llama, about 146M parameters, vocabulary 32k) is built into a temp
dir and loaded through ``illume.models.load_model`` (Pillow image processor). For each concurrency
(a batch of that many requests: n candidates over two temperatures, exactly ``--tokens`` new
tokens each, min_new_tokens = max_new_tokens), with a given answer and without one (the answer
decoded greedily first), the same requests run through ``Generator(engine="fork")`` and
``Generator(engine="repeated")``, alternating, ``--runs`` times; the table gives the median
candidates/s of each, the ratio fork / repeated, each engine's peak RSS during its runs, and how
many candidates the two engines gave identically (CPU fp32: all of them, up to arg-max ties).

Time cap: before each concurrency level the cost of one run is estimated from the level before
(linear in the batch), and inside a level from its own first run; a level runs as many of its
``--runs`` as fit in what is left of the cap (printed when fewer), and a level of which not even
one run fits is skipped with a note, as is one whose estimated KV cache would not fit in memory.
Figures, not assertions; they go to docs/BENCHMARKS.md ("Generation engine").
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

DEFAULT_CAP_S = 780.0  # with engine_served.py (960 s) the LLaVA-1.5-shaped benches stay under 30 min
CAP_ENV = "ILLUME_BENCH_ENGINE_CAP_S"
ENGINES = ("fork", "repeated")
MODES = ("given", "generated")  # a given answer / the answer decoded first
TARGET = 2.0  # fork >= 2x repeated at concurrency 1 and 32, both modes (issue 22)


@dataclass(frozen=True)
class Shape:
    """A LLaVA-style model's shape: a CLIP vision tower and a Llama language model."""

    image: int
    patch: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_ffn: int
    vocab: int

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2


SHAPES = {
    # LLaVA-1.5's geometry (336 px, patch 14, 576 image tokens, 32k vocabulary) at ~146M parameters.
    "150m": Shape(336, 14, 640, 8, 10, 2560, 768, 8, 12, 2048, 32000),
    # CLIP-L/336 and a Llama-7B-shaped language model (tests/bench/engine_gpu.py builds it on a GPU).
    "7b": Shape(336, 14, 1024, 24, 16, 4096, 4096, 32, 32, 11008, 32000),
    # For quick checks of the bench's own logic.
    "tiny": Shape(56, 14, 32, 1, 2, 64, 64, 2, 2, 128, 512),
}


def word_tokenizer(vocab: int) -> Any:
    """The project's word-level test tokenizer (BOS prepended, left padding) with ``vocab`` words."""
    from illume.models.default import _FALLBACK_TEXTS
    from illume.models.tiny import ARCH_SPECIALS, train_word_tokenizer

    words = " ".join(f"w{i}" for i in range(vocab))
    return train_word_tokenizer([*_FALLBACK_TEXTS, words], ARCH_SPECIALS["llava"], vocab_size=vocab)


def llava_config(tokenizer: Any, shape: Shape) -> Any:
    """A LLaVA-1.5-style config (vision layer -2, the CLS feature dropped) for ``shape``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_ffn,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image,
        patch_size=shape.patch,
        projection_dim=shape.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_ffn,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def llava_processor(tokenizer: Any, shape: Shape) -> Any:
    """A LlavaProcessor with the Pillow CLIP image processor: ``shape.image_tokens`` tokens per image."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": shape.image}, crop_size={"height": shape.image, "width": shape.image}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_checkpoint(out: Path, shape: Shape, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``shape`` with its processor, saved to ``out`` (CPU, fp32)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(shape.vocab)
    model = LlavaForConditionalGeneration(llava_config(tokenizer, shape))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    llava_processor(tokenizer, shape).save_pretrained(out)
    return out


def noise_image(i: int, size: int) -> Image.Image:
    """A distinct random RGB image per request (so no two requests share an encoding)."""
    rng = random.Random(i)
    return Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))


def make_requests(count: int, mode: str, n: int, tokens: int, temperatures: Sequence[float], size: int):
    from illume.generation.generator import GenerateRequest, SamplingParams

    return [
        GenerateRequest(
            noise_image(i, size),
            f"what colour is the square w{i}?",
            "red" if mode == "given" else None,
            SamplingParams(
                n=n,
                temperatures=tuple(temperatures),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                seed=1000 + i,
            ),
        )
        for i in range(count)
    ]


class PeakRss:
    """The process's peak resident memory over a span (a thread samples /proc/self/statm)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * self._page
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakRss:
        self.peak = self.current()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())


def max_rss_bytes() -> int:
    """The whole process's peak RSS so far (getrusage; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_bytes(shape: Shape, rows: int, prompt_tokens: int, tokens: int, bytes_per: int) -> int:
    """The KV cache of ``rows`` decode rows (keys and values of every layer), without the prompts' states."""
    return rows * (prompt_tokens + tokens) * shape.text_layers * 2 * shape.text_hidden * bytes_per


@dataclass
class Cell:
    """One (concurrency, answer mode) of the table: per engine, each run's figures."""

    level: int
    mode: str
    seconds: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENGINES})
    candidates: dict[str, list[int]] = field(default_factory=lambda: {e: [] for e in ENGINES})
    tokens: dict[str, list[int]] = field(default_factory=lambda: {e: [] for e in ENGINES})
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENGINES, 0))
    same: tuple[int, int] = (0, 0)  # candidates identical under both engines (first run), of all
    notes: dict[str, str] = field(default_factory=dict)  # per engine: how it had to run (batches)

    def rate(self, engine: str) -> float | None:
        if not self.seconds[engine]:
            return None
        return statistics.median(
            c / s for c, s in zip(self.candidates[engine], self.seconds[engine], strict=True)
        )

    def token_rate(self, engine: str) -> float | None:
        if not self.seconds[engine]:
            return None
        return statistics.median(
            t / s for t, s in zip(self.tokens[engine], self.seconds[engine], strict=True)
        )

    def ratio(self) -> float | None:
        fork, repeated = self.rate("fork"), self.rate("repeated")
        return fork / repeated if fork and repeated else None

    @property
    def runs(self) -> int:
        return max(len(v) for v in self.seconds.values())


def same_candidates(a: Sequence[Any], b: Sequence[Any]) -> tuple[int, int]:
    """How many candidates two replies to the same requests share index by index, of how many."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        xs, ys = [c.text for c in x.candidates], [c.text for c in y.candidates]
        total += max(len(xs), len(ys))
        same += sum(1 for p, q in zip(xs, ys, strict=False) if p == q)
    return same, total


@dataclass
class Budget:
    """The time cap of the whole bench, from ``started``."""

    cap_s: float
    started: float

    def left(self) -> float:
        return self.cap_s - (time.perf_counter() - self.started)


def run_levels(
    levels: Sequence[int],
    modes: Sequence[str],
    runs: int,
    budget: Budget,
    one_run: Callable[[int, str, int, Cell], None],
    fits_memory: Callable[[int], str | None] = lambda level: None,
    label: str = "concurrency",
) -> tuple[list[Cell], list[str]]:
    """Measure each level (ascending) within the budget; ``one_run(level, mode, run, cell)`` fills a cell.

    Returns the cells and the notes on what was cut (fewer runs, skipped levels).
    """
    cells: list[Cell] = []
    notes: list[str] = []
    per_request_run_s: float | None = None  # one run of all modes and engines, per request in the batch
    for level in sorted(levels):
        memory = fits_memory(level)
        if memory:
            notes.append(f"{label} {level} skipped: {memory}")
            print(f"NOTE: {notes[-1]}", flush=True)
            continue
        if per_request_run_s is not None:
            estimate = per_request_run_s * level
            fit = math.floor(budget.left() / estimate) if estimate > 0 else runs
            if fit < 1:
                notes.append(
                    f"{label} {level} skipped: one run would take about {estimate:.0f} s "
                    f"and {max(0.0, budget.left()):.0f} s of the {budget.cap_s:.0f} s cap are left "
                    f"(raise --time-cap or {CAP_ENV})"
                )
                print(f"NOTE: {notes[-1]}", flush=True)
                continue
        level_cells = [Cell(level, mode) for mode in modes]
        done, run_s = 0, 0.0
        for run in range(runs):
            if run > 0:
                estimate = run_s
                if budget.left() < estimate:
                    notes.append(
                        f"{label} {level}: {run} of {runs} runs (the next would take about "
                        f"{estimate:.0f} s, {max(0.0, budget.left()):.0f} s of the cap left)"
                    )
                    print(f"NOTE: {notes[-1]}", flush=True)
                    break
            t = time.perf_counter()
            for cell in level_cells:
                one_run(level, cell.mode, run, cell)
            run_s = time.perf_counter() - t
            done += 1
            per_request_run_s = run_s / level
        cells.extend(level_cells)
        print(f"  {label} {level}: {done} run(s), {budget.left():.0f} s of the cap left", flush=True)
    return cells, notes


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def print_table(cells: Sequence[Cell]) -> None:
    print()
    print(
        "| concurrency | answer | runs | fork cand/s | repeated cand/s | fork / repeated "
        "| fork peak RSS MiB | repeated peak RSS MiB | identical candidates |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        ratio = c.ratio()
        failed = "; ".join(f"{e}: {m}" for e, m in c.notes.items())
        print(
            f"| {c.level} | {c.mode} | {c.runs} | {_fmt(c.rate('fork'))} | {_fmt(c.rate('repeated'))} "
            f"| {_fmt(ratio)}{'x' if ratio else ''} | {_mib(c.peak['fork'])} | {_mib(c.peak['repeated'])} "
            f"| {c.same[0]}/{c.same[1]}{' ' + failed if failed else ''} |"
        )


def print_targets(cells: Sequence[Cell], levels: Sequence[int] = (1, 32)) -> None:
    print(
        f"\nTarget: fork >= {TARGET:.0f}x repeated at concurrency 1 and 32, with and without a given answer"
    )
    for level in levels:
        for mode in MODES:
            cell = next((c for c in cells if c.level == level and c.mode == mode), None)
            ratio = cell.ratio() if cell else None
            failed = "; ".join(f"{e} {m}" for e, m in cell.notes.items()) if cell else ""
            verdict = (
                f"not measured{' (' + failed + ')' if failed else ''}"
                if ratio is None
                else ("met" if ratio >= TARGET else "NOT met")
            )
            runs = f" (median of {cell.runs})" if cell and ratio is not None else ""
            shown = "-" if ratio is None else f"{ratio:.2f}x"
            print(f"  concurrency {level}, answer {mode}: {shown}{runs} -> {verdict}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=["150m", "tiny"], default="150m", help="model shape (tiny: logic only)"
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrencies (batch sizes)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per level (the median is reported)")
    parser.add_argument("--n", type=int, default=10, help="candidates per request")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per candidate (exactly)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.9])
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="answer given / generated"
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=float(os.environ.get(CAP_ENV, DEFAULT_CAP_S)),
        help=f"seconds for the whole bench (default ${CAP_ENV} or {DEFAULT_CAP_S:.0f})",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--smoke", action="store_true", help="concurrency 1 only, one run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.levels, args.runs = [1], 1
    started = time.perf_counter()
    budget = Budget(args.time_cap, started)

    from illume.generation.generator import Generator
    from illume.models import ModelSettings, load_model
    from tests.bench.models import parameter_count

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.size]
    with tempfile.TemporaryDirectory(prefix="illume-engine-bench-") as tmp:
        path = build_checkpoint(Path(tmp) / f"llava-{args.size}", shape)
        params = parameter_count(path)
        loaded = load_model(ModelSettings(path=path, device="cpu", image_backend="pil"))
    generators = {e: Generator(loaded, engine=e) for e in ENGINES}
    prompt_tokens = shape.image_tokens + 24  # the image and a rationale prompt of about 20 words
    print(
        f"model: random LLaVA, {params / 1e6:.1f}M parameters ({shape.image} px, patch {shape.patch}, "
        f"{shape.image_tokens} image tokens; vision {shape.vision_hidden} x {shape.vision_layers}, "
        f"LM {shape.text_hidden} x {shape.text_layers}, vocab {len(loaded.tokenizer)}), fp32 on CPU, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; built in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    print(
        f"requests: n = {args.n} over temperatures {args.temperatures}, exactly {args.tokens} new tokens; "
        f"levels {args.levels}, {args.runs} run(s) each, answer {' / '.join(args.modes)}; "
        f"time cap {args.time_cap:.0f} s",
        flush=True,
    )
    # Warm-up: one full-size request per engine and answer mode. A shorter one leaves the first
    # measured run paying for the allocator's and oneDNN's first calls at the full shapes (measured:
    # 7.5 s for a first fork run with a given answer, 4.1-4.7 s for the next ones).
    for engine in ENGINES:
        for mode in args.modes:
            generators[engine].generate(
                make_requests(1, mode, args.n, args.tokens, args.temperatures, shape.image)
            )

    def fits_memory(level: int) -> str | None:
        need = kv_bytes(shape, level * args.n, prompt_tokens, args.tokens, 4)
        available = mem_available_bytes()
        if available is not None and need > 0.8 * available:
            return (
                f"its decode KV cache alone is about {need / 2**30:.1f} GiB and "
                f"{available / 2**30:.1f} GiB are available"
            )
        return None

    rss = PeakRss()
    base_rss = rss.current()  # after loading and warm-up: what every level starts from
    measured_peaks: dict[str, tuple[int, int]] = {}  # engine -> (level, peak RSS) of its last run

    def batch_that_fits(engine: str, level: int) -> tuple[int, str]:
        """The largest batch (``level`` halved until it fits) whose peak RSS, extrapolated linearly
        in the batch from the engine's last level measured, fits in 90% of the memory this process
        could have; with the reason when it is smaller than ``level``. A server bounds its batches
        the same way (its token budget), so the requests then run as several batches in turn."""
        available = mem_available_bytes()
        if engine not in measured_peaks or available is None:
            return level, ""
        last_level, last_peak = measured_peaks[engine]
        limit = 0.9 * (available + rss.current())
        batch = level
        while batch > 1 and base_rss + (last_peak - base_rss) * batch / last_level > limit:
            batch = (batch + 1) // 2
        if batch == level:
            return level, ""
        predicted = base_rss + (last_peak - base_rss) * level / last_level
        return batch, (
            f"one batch of {level} would peak at about {predicted / 2**30:.1f} GiB RSS "
            f"({last_peak / 2**30:.1f} GiB at {last_level}; {limit / 2**30:.1f} GiB usable): "
            f"batches of {batch}"
        )

    def one_run(level: int, mode: str, run: int, cell: Cell) -> None:
        requests = make_requests(level, mode, args.n, args.tokens, args.temperatures, shape.image)
        replies = {}
        for engine in ENGINES if run % 2 == 0 else ENGINES[::-1]:
            batch, reason = batch_that_fits(engine, level)
            if reason and engine not in cell.notes:
                cell.notes[engine] = reason
                print(f"NOTE: concurrency {level}, answer {mode}, {engine}: {reason}", flush=True)
            with PeakRss() as peak:
                t = time.perf_counter()
                replies[engine] = [
                    reply
                    for start in range(0, level, batch)
                    for reply in generators[engine].generate(requests[start : start + batch])
                ]
                seconds = time.perf_counter() - t
            cell.seconds[engine].append(seconds)
            cell.candidates[engine].append(sum(len(r.candidates) for r in replies[engine]))
            cell.tokens[engine].append(sum(c.token_count for r in replies[engine] for c in r.candidates))
            cell.peak[engine] = max(cell.peak[engine], peak.peak)
            if batch == level and level >= measured_peaks.get(engine, (0, 0))[0]:
                measured_peaks[engine] = (level, max(peak.peak, measured_peaks.get(engine, (0, 0))[1]))
            print(
                f"    concurrency {level}, answer {mode}, run {run + 1}, {engine}: {seconds:.1f} s, "
                f"{cell.candidates[engine][-1] / seconds:.2f} cand/s, peak RSS {peak.peak / 2**20:.0f} MiB",
                flush=True,
            )
        if run == 0:
            cell.same = same_candidates(replies["fork"], replies["repeated"])

    cells, notes = run_levels(args.levels, args.modes, args.runs, budget, one_run, fits_memory)
    print_table(cells)
    print_targets(cells)
    for note in notes:
        print(f"NOTE: {note}")
    print(
        f"\nwhole bench {time.perf_counter() - started:.0f} s; "
        f"process peak RSS {max_rss_bytes() / 2**20:.0f} MiB",
        flush=True,
    )


if __name__ == "__main__":
    main()
