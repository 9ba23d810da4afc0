"""Generation engine benchmark on a GPU: a 7B-shaped random LLaVA in bf16, fork vs repeated rows.

    make bench-gpu                                       # on a machine with a CUDA device
    python -m tests.bench.engine_gpu [--levels 1 8 32] [--time-cap 480]
    python -m tests.bench.engine_gpu --dry-run           # CPU, tiny model: checks this script's logic

In-process (no Ray). The model is LLaVA-1.5-7B-shaped: a CLIP-L/336 vision tower (1024 x 24,
patch 14, 576 image tokens) and a Llama-7B-shaped language model (4096 x 32 layers, 32 heads,
intermediate 11008, vocabulary 32k), initialised at random directly on the GPU in bf16 (nothing
saved or loaded: only the processor goes through a temp dir and ``AutoProcessor``, Pillow backend).
For batches of 1, 8 and 32 requests (n candidates over two temperatures, exactly ``--tokens`` new
tokens each; with a given answer and without one) the same requests run through
``Generator(engine="fork")`` and ``Generator(engine="repeated")``, alternating, ``--runs`` times;
the table gives the median candidates/s and generated tokens/s of each (candidates' tokens only),
the ratio fork / repeated, and each engine's peak GPU memory (``torch.cuda.max_memory_allocated``).
A configuration that runs out of GPU memory is reported as OOM and the bench goes on.

Agreement: in bf16 a row's logits depend on the batch it runs in (other kernels, other reduction
orders), so the candidates of a request run alone and the same request inside a batch need not be
identical. For the largest batch measured, up to ``--agree`` of its requests are run again alone
with each engine, and the share of candidates (and generated answers) identical to the batch's is
printed, beside the share identical between the two engines in the same batch.

Without a CUDA device it stops at once with a message (exit status 2), unless ``--dry-run``.
A time cap (``--time-cap``, default 480 s for the measurements) keeps the whole run under 10 minutes
with the model's start; levels that would not fit are skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tests.bench.engine import (
    ENGINES,
    MODES,
    SHAPES,
    Budget,
    Cell,
    PeakRss,
    Shape,
    llava_config,
    llava_processor,
    make_requests,
    run_levels,
    same_candidates,
    word_tokenizer,
)

DEFAULT_CAP_S = 480.0
AGREE_RESERVE_S = 60.0  # kept back from the levels for the agreement runs


def require_cuda() -> None:
    """Exit at once, with the reason, when torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    build = torch.version.cuda or "none (a CPU-only build)"
    sys.stderr.write(
        f"engine_gpu: no CUDA device is visible (torch {torch.__version__}, CUDA build {build}). "
        "This benchmark needs a GPU; run it on a GPU machine (make bench-gpu), "
        "or pass --dry-run for a CPU check of the script with a tiny model.\n"
    )
    raise SystemExit(2)


def build_loaded(shape: Shape, device: torch.device, dtype: torch.dtype, workdir: Path) -> Any:
    """A ``LoadedModel`` whose random model is initialised in place on ``device`` in ``dtype``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from illume.models.loading import LoadedModel, derive_image_placeholder

    tokenizer = word_tokenizer(shape.vocab)
    config = llava_config(tokenizer, shape)
    torch.manual_seed(0)
    with device:
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    llava_processor(tokenizer, shape).save_pretrained(workdir)
    processor = AutoProcessor.from_pretrained(workdir, local_files_only=True, backend="pil")
    processor.tokenizer.padding_side = "left"
    return LoadedModel(
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        model_id=workdir.name,
        model_type=str(config.model_type),
        image_placeholder=derive_image_placeholder(processor, str(config.model_type)),
        path=workdir,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak GPU memory allocated by torch over a span (peak RSS on a CPU dry run)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._rss: PeakRss | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = PeakRss().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._rss is not None:
            self._rss.__exit__()
            self.peak = self._rss.peak


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(cells: Sequence[Cell], memory: str) -> None:
    print()
    print(
        "| batch | answer | runs | fork cand/s | repeated cand/s | fork / repeated | fork tokens/s "
        f"| repeated tokens/s | fork peak {memory} GiB | repeated peak {memory} GiB "
        "| identical fork / repeated |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        ratio = c.ratio()
        cols = []
        for engine in ENGINES:
            failed = c.failed.get(engine)
            cols.append(failed if failed and not c.seconds[engine] else _fmt(c.rate(engine)))
        peaks = [f"{c.peak[e] / 2**30:.1f}" if c.peak[e] else "-" for e in ENGINES]
        same = f"{c.same[0]}/{c.same[1]}" if c.same[1] else "-"
        print(
            f"| {c.level} | {c.mode} | {c.runs} | {cols[0]} | {cols[1]} "
            f"| {'-' if ratio is None else f'{ratio:.2f}x'} | {_fmt(c.token_rate('fork'), '.0f')} "
            f"| {_fmt(c.token_rate('repeated'), '.0f')} | {peaks[0]} | {peaks[1]} | {same} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (requests)")
    parser.add_argument("--runs", type=int, default=3, help="runs per level (the median is reported)")
    parser.add_argument("--n", type=int, default=10, help="candidates per request")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per candidate (exactly)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.9])
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="answer given / generated"
    )
    parser.add_argument("--agree", type=int, default=16, help="requests of the largest batch rerun alone")
    parser.add_argument("--time-cap", type=float, default=DEFAULT_CAP_S, help="seconds for the measurements")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny model, small levels: the logic only"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        shape, device = SHAPES["tiny"], torch.device("cpu")
        args.levels, args.runs, args.n, args.tokens, args.agree = [1, 2, 4], 2, 4, 4, 4
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        require_cuda()
        shape, device = SHAPES["7b"], torch.device("cuda")
    dtype = torch.bfloat16
    started = time.perf_counter()

    from illume.generation.generator import Generator

    with tempfile.TemporaryDirectory(prefix="illume-engine-gpu-") as tmp:
        loaded = build_loaded(shape, device, dtype, Path(tmp) / "llava-7b-shaped")
    synchronize(device)
    params = sum(p.numel() for p in loaded.model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(
        f"model: random LLaVA, {params / 1e6:,.0f}M parameters in {str(dtype).removeprefix('torch.')} "
        f"on {name} ({shape.image} px, {shape.image_tokens} image tokens; vision {shape.vision_hidden} x "
        f"{shape.vision_layers}, LM {shape.text_hidden} x {shape.text_layers}); torch {torch.__version__}; "
        f"built in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    print(
        f"requests: n = {args.n} over temperatures {args.temperatures}, exactly {args.tokens} new tokens; "
        f"batches {args.levels}, {args.runs} run(s) each, answer {' / '.join(args.modes)}; "
        f"time cap {args.time_cap:.0f} s",
        flush=True,
    )
    generators = {e: Generator(loaded, engine=e) for e in ENGINES}
    for engine in ENGINES:  # warm-up: kernels, allocator, first-call costs
        generators[engine].generate(make_requests(2, "generated", 2, 2, args.temperatures, shape.image))
    synchronize(device)

    batch_replies: dict[tuple[int, str, str], list[Any]] = {}

    def one_run(level: int, mode: str, run: int, cell: Cell) -> None:
        requests = make_requests(level, mode, args.n, args.tokens, args.temperatures, shape.image)
        replies: dict[str, list[Any]] = {}
        for engine in ENGINES if run % 2 == 0 else ENGINES[::-1]:
            if engine in cell.failed:
                continue
            try:
                with PeakMemory(device) as memory:
                    synchronize(device)
                    t = time.perf_counter()
                    replies[engine] = generators[engine].generate(requests)
                    synchronize(device)
                    seconds = time.perf_counter() - t
            except torch.OutOfMemoryError:
                cell.failed[engine] = "OOM"
            if engine in cell.failed:  # outside the except block, so its frames' tensors are freed
                replies.pop(engine, None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"    batch {level}, answer {mode}, {engine}: out of GPU memory", flush=True)
                continue
            cell.seconds[engine].append(seconds)
            cell.candidates[engine].append(sum(len(r.candidates) for r in replies[engine]))
            cell.tokens[engine].append(sum(c.token_count for r in replies[engine] for c in r.candidates))
            cell.peak[engine] = max(cell.peak[engine], memory.peak)
            print(
                f"    batch {level}, answer {mode}, run {run + 1}, {engine}: {seconds:.2f} s, "
                f"{cell.candidates[engine][-1] / seconds:.1f} cand/s, "
                f"{cell.tokens[engine][-1] / seconds:.0f} tokens/s, peak {memory.peak / 2**30:.1f} GiB",
                flush=True,
            )
        if run == 0:
            for engine, reply in replies.items():
                batch_replies[(level, mode, engine)] = reply
            if len(replies) == len(ENGINES):
                cell.same = same_candidates(replies["fork"], replies["repeated"])

    budget = Budget(args.time_cap - AGREE_RESERVE_S, time.perf_counter())
    cells, notes = run_levels(args.levels, args.modes, args.runs, budget, one_run, label="batch")
    print_table(cells, "GPU" if device.type == "cuda" else "RSS")

    # Agreement: requests of the largest batch measured, each run alone, against the batch's replies.
    budget.cap_s += AGREE_RESERVE_S
    batched = [lvl for lvl in sorted({k[0] for k in batch_replies}) if lvl > 1]
    if batched:
        level = batched[-1]
        mode = "generated" if "generated" in args.modes else args.modes[0]
        count = min(level, args.agree)
        requests = make_requests(level, mode, args.n, args.tokens, args.temperatures, shape.image)[:count]
        solo_s = [
            statistics.median(c.seconds[e]) / c.level
            for c in cells
            if c.level == min(args.levels) and c.mode == mode
            for e in ENGINES
            if c.seconds[e]
        ]
        per_request = max(solo_s) if solo_s else 1.0
        fit = int(max(0.0, budget.left()) / (per_request * len(ENGINES)))
        if fit < count:
            notes.append(f"agreement: {max(fit, 0)} of {count} requests run alone (time cap)")
            count = max(fit, 0)
        print(f"\nAgreement: {count} requests of batch {level} (answer {mode}) run alone, bf16", flush=True)
        for engine in ENGINES:
            batch = batch_replies.get((level, mode, engine))
            if not batch or not count:
                print(f"  {engine}: not measured")
                continue
            alone = [generators[engine].generate([r])[0] for r in requests[:count]]
            same, total = same_candidates(alone, batch[:count])
            answers = sum(1 for a, b in zip(alone, batch[:count], strict=False) if a.answer == b.answer)
            print(
                f"  {engine}: candidates identical alone vs in batch {level}: {same}/{total} "
                f"({100 * same / max(total, 1):.0f}%); answers identical: {answers}/{count}",
                flush=True,
            )
    for note in notes:
        print(f"NOTE: {note}")
    print(f"\nwhole bench {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
