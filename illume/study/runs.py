"""The study's runs: SFT on gold rationales against ILLUME rounds, on one world, recorded as JSON.

Contract (docs/STUDY.md):

- a run is named ``<family>-<setting>-seed<S>`` (``parse_run``): ``sft-<P>`` (supervised LoRA
  fine-tuning on the gold rationales of P % of the pool's questions), ``illume-paper`` (every pool
  question judged every round, every accepted candidate so far trained on), ``illume-paper-parent``
  (the same, each round starting from the previous round's adapter), ``illume-paper-rouge`` (the
  same, the paper's ROUGE-L >= 0.7 critic instead of the fact critic), ``illume-paper-replay-explained``
  (the same, answer rows drawn from every answered question, those with rationale rows included:
  a step-3 change), the paper protocol with several of these changes at once, named in that
  order (``illume-paper-parent-replay-explained``), ``illume-minimal-<P>`` (P %
  of the pool judged per round, never a question already accepted), and ``base`` (the base model,
  measured once per world); ``study_grid(seeds)`` lists the planned runs of those seeds;
- every run of world seed S uses the same world (``StudyConfig.world_sizes``, built once under
  ``<work>/worlds/seed-S``), the same pool (the first ``pool_size`` train items in a seeded order),
  the same val and test items, the same LoRA shape and training settings (``StudyConfig.loop``),
  and answer-only replay rows drawn from the whole train split;
- ``run_study_run(spec, ...)`` runs one run under ``<work>/runs/<name>`` and writes its record to
  ``<records>/<name>.json`` after every finished round (``finished: false`` until the last; a
  finished record is never run again); an interrupted run resumes from its last finished round
  when its work directory is still there;
- a record holds the run's config, world seed, the model manifest's sha256, the caller's
  provenance (git commit), wall time per phase, one entry per round (judged questions and
  candidates so far, rationale and answer rows, val figures: per-candidate, per-question and
  greedy acceptance per critic, ROUGE-L, BLEU-4, METEOR, CIDEr, answer accuracy) and the test
  figures of its final adapter; val and test are only measured, never used inside a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from illume.data.vqax import VQAXItem
from illume.training.loop import LoopConfig, LoopRound, evaluate_with, val_summary, write_atomically
from illume.training.round import TrainConfig
from illume.training.snapshot import SnapshotConfig

Family = Literal["base", "sft", "illume"]
RECORD_VERSION = 1
_NAME = re.compile(r"^(?P<family>base|sft|illume)(?:-(?P<setting>[a-z0-9-]+?))?-seed(?P<seed>\d+)$")
# The paper protocol's step-3 changes, composable in this order (``paper-parent-replay-explained``).
_PAPER_CHANGES = ("parent", "rouge", "replay-explained")
_SETTINGS = re.compile(
    r"^(?:paper" + "".join(f"(?:-{c})?" for c in _PAPER_CHANGES) + r"|minimal-\d+(?:\.\d+)?)$"
)


def _study_loop() -> LoopConfig:
    # The in-process recipe of docs/TRAINING.md: LoRA r 16 on the attention projections, a rate
    # decaying linearly from 1e-3, ten answer rows per rationale row, 10 candidates at 0.3/0.9.
    return LoopConfig(
        n=10,
        temperatures=(0.3, 0.9),
        top_k_fraction=0.1,
        batch_size=16,
        val_limit=None,
        eval_critics=("fact", "rouge_l"),
        eval_baseline=False,
        train=TrainConfig(learning_rate=1e-3, lr_schedule="linear", lora_r=16, lora_alpha=32),
        # The paper's answer replay (questions with rationale rows give none): the grid's reference,
        # recorded so; the step-3 setting "-replay-explained" turns it on.
        snapshot=SnapshotConfig(replay_explained=False),
    )


class StudyConfig(BaseModel):
    """Settings shared by every run of the study (docs/STUDY.md, "The grid")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    world_train: int = Field(
        2000, ge=1, description="Train items of each world (the pool and the replay source)."
    )
    world_val: int = Field(500, ge=1, description="Val items of each world (measured every round).")
    world_test: int = Field(500, ge=0, description="Test items of each world (measured once per run).")
    pool_size: int = Field(
        1500, ge=1, description="Train questions a run judges or takes gold rationales from."
    )
    rounds: int = Field(8, ge=1, description="Most ILLUME rounds per run.")
    stop_after_barren_rounds: int = Field(
        2, ge=1, description="A paper-protocol run ends after this many rounds in a row accepting nothing."
    )
    sft_fractions: tuple[float, ...] = Field(
        (0.1, 0.25, 0.5, 1.0),
        description="Shares of the pool's questions whose gold rationales SFT trains on.",
    )
    minimal_shares: tuple[float, ...] = Field(
        (0.02, 0.1), description="Shares of the pool judged per round in the minimal-feedback runs."
    )
    loop: LoopConfig = Field(default_factory=_study_loop, description="Sampling, evaluation and training.")

    def world_sizes(self) -> dict[str, int]:
        return {"train": self.world_train, "val": self.world_val, "test": self.world_test}


@dataclass(frozen=True)
class RunSpec:
    """One run of the study: its family, setting and world seed."""

    family: Family
    setting: str
    seed: int

    @property
    def name(self) -> str:
        middle = f"-{self.setting}" if self.setting else ""
        return f"{self.family}{middle}-seed{self.seed}"

    def sft_fraction(self) -> float:
        return float(self.setting) / 100

    def paper_changes(self) -> set[str]:
        """The step-3 changes a paper-protocol setting names (``paper-parent-replay-explained``:
        parent and replay-explained); empty for any other setting."""
        if not self.setting.startswith("paper"):
            return set()
        rest = self.setting.removeprefix("paper")
        return {change for change in _PAPER_CHANGES if f"-{change}" in rest}

    def loop_config(self, study: StudyConfig) -> LoopConfig:
        """The loop settings of an ILLUME run (the study's, changed only where the setting says)."""
        base = study.loop
        update: dict[str, Any] = {
            "rounds": study.rounds,
            "pool_size": study.pool_size,
            "seed": self.seed,
            "snapshot": base.snapshot.model_copy(update={"seed": self.seed}),
            "train": base.train.model_copy(update={"seed": self.seed}),
        }
        if self.setting.startswith("paper"):
            update |= {
                "feedback_per_round": None,
                "resample_accepted": True,
                "stop_after_barren_rounds": study.stop_after_barren_rounds,
            }
            changes = self.paper_changes()
            if "parent" in changes:
                update["train"] = update["train"].model_copy(update={"init_from": "parent"})
            if "rouge" in changes:
                update["critic"] = "rouge_l"
            if "replay-explained" in changes:
                update["snapshot"] = update["snapshot"].model_copy(update={"replay_explained": True})
        else:
            share = float(self.setting.removeprefix("minimal-")) / 100
            update |= {
                "feedback_per_round": max(1, round(share * study.pool_size)),
                "resample_accepted": False,
            }
        return base.model_copy(update=update)


def parse_run(name: str) -> RunSpec:
    """The spec of a run name (``sft-10-seed2``, ``illume-paper-seed3``, ``base-seed2``, ...)."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"not a study run name: {name!r} (e.g. sft-10-seed2, illume-paper-seed2)")
    family, setting, seed = match["family"], match["setting"] or "", int(match["seed"])
    if family == "base" and setting:
        raise ValueError(f"the base run has no setting: {name!r}")
    if family == "sft" and not re.fullmatch(r"\d+(?:\.\d+)?", setting):
        raise ValueError(f"an SFT run names the percent of the pool: {name!r} (e.g. sft-25-seed2)")
    if family == "sft" and not 0 < float(setting) <= 100:
        raise ValueError(f"an SFT share is a percent in (0, 100]: {name!r}")
    if family == "illume" and not _SETTINGS.match(setting):
        raise ValueError(
            f"unknown ILLUME setting in {name!r}: paper, paper with any of -parent, -rouge, "
            "-replay-explained in that order (paper-parent-replay-explained), or minimal-<percent>"
        )
    return RunSpec(family, setting, seed)  # type: ignore[arg-type]


def _percent(share: float) -> str:
    return f"{100 * share:g}"


def study_grid(seeds: Sequence[int], study: StudyConfig, *, pruned_seed: int | None = None) -> list[RunSpec]:
    """The planned runs of ``seeds``: base, SFT per fraction, paper protocol, minimal feedback; the
    parent-init and ROUGE-L-critic runs only on ``pruned_seed`` (default: the first seed)."""
    pruned = seeds[0] if pruned_seed is None and seeds else pruned_seed
    runs: list[RunSpec] = []
    for seed in seeds:
        runs.append(RunSpec("base", "", seed))
        runs += [RunSpec("sft", _percent(f), seed) for f in study.sft_fractions]
        runs.append(RunSpec("illume", "paper", seed))
        runs += [RunSpec("illume", f"minimal-{_percent(s)}", seed) for s in study.minimal_shares]
        if seed == pruned:
            runs += [RunSpec("illume", "paper-parent", seed), RunSpec("illume", "paper-rouge", seed)]
    return runs


def seeded_order(items: Sequence[VQAXItem], *parts: object) -> list[VQAXItem]:
    def key(item: VQAXItem) -> bytes:
        return hashlib.sha256(
            "/".join(map(str, ("illume-study", *parts, item.question_id))).encode()
        ).digest()

    return sorted(items, key=key)


def load_record(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@dataclass
class StudyContext:
    """Where a run reads and writes, and what it records about its provenance."""

    model_dir: Path
    work: Path
    records: Path
    study: StudyConfig
    provenance: dict[str, Any]
    progress: bool = True
    log: Callable[[str], None] = print
    shared_machine: bool = False

    def world(self, seed: int) -> dict[str, list[VQAXItem]]:
        """World ``seed`` at the study's sizes (built on first use; rebuilt if the sizes differ)."""
        from illume.data import load_vqax
        from illume.world import build_world

        directory = self.work / "worlds" / f"seed-{seed}"
        meta = directory / "world.json"
        sizes = self.study.world_sizes()
        if meta.is_file() and json.loads(meta.read_text()).get("sizes") == sizes:
            return {split: load_vqax(directory / f"{split}.json") for split in sizes}
        return build_world(directory, sizes=sizes, seed=seed)

    def pool(self, world: dict[str, list[VQAXItem]], seed: int) -> list[VQAXItem]:
        return seeded_order(world["train"], seed, "pool")[: self.study.pool_size]


def new_record(spec: RunSpec, ctx: StudyContext, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "run": spec.name,
        "family": spec.family,
        "setting": spec.setting,
        "world_seed": spec.seed,
        "study": ctx.study.model_dump(mode="json", exclude={"loop"}),
        "config": config,
        "model_manifest_sha256": file_sha256(ctx.model_dir / "manifest.json"),
        "provenance": ctx.provenance,
        "shared_machine": ctx.shared_machine,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "finished": False,
        "stopped_early": None,
        "seconds": {"sample": 0.0, "train": 0.0, "eval": 0.0, "test": 0.0, "total": 0.0},
        "load_average": [],
        "rounds": [],
        "test": None,
    }


def save_record(record: dict[str, Any], ctx: StudyContext) -> Path:
    ctx.records.mkdir(parents=True, exist_ok=True)
    path = ctx.records / f"{record['run']}.json"
    write_atomically(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def _measure(
    adapter_dir: Path | None, split: Sequence[VQAXItem], ctx: StudyContext, seed: int
) -> dict[str, Any]:
    from illume.evaluation.evaluate import load_generator

    generator, installed = load_generator(
        ctx.model_dir, adapter_dir, ctx.study.loop.device, adapter_name="study"
    )
    return val_summary(evaluate_with(generator, split, installed, ctx.study.loop, seed=seed))


def round_entry(r: LoopRound, judged_so_far: tuple[int, int]) -> dict[str, Any]:
    questions, candidates = judged_so_far
    return {
        "round": r.round,
        "judged_questions": r.feedback,
        "judged_candidates": r.candidates,
        "judged_questions_so_far": questions,
        "judged_candidates_so_far": candidates,
        "accepted_candidates": r.accepted_candidates,
        "questions_with_rationale": r.questions_with_rationale,
        "rationale_rows": r.rationale_rows,
        "answer_rows": r.answer_rows,
        "rationale_loss_weight": r.rationale_loss_weight,
        "trained": r.trained,
        "train_loss": r.train_loss,
        "seconds": {"sample": r.sample_seconds, "train": r.train_seconds, "eval": r.eval_seconds},
        "val": r.val,
    }


def _run_base(spec: RunSpec, ctx: StudyContext, record: dict[str, Any]) -> None:
    world = ctx.world(spec.seed)
    t0 = time.perf_counter()
    val = _measure(None, world["val"], ctx, spec.seed)
    record["seconds"]["eval"] = time.perf_counter() - t0
    record["rounds"] = [{"round": None, "rationale_rows": 0, "judged_candidates_so_far": 0, "val": val}]
    save_record(record, ctx)
    t0 = time.perf_counter()
    record["test"] = _measure(None, world["test"], ctx, spec.seed) if world["test"] else None
    record["seconds"]["test"] = time.perf_counter() - t0


def sft_judged(pool: Sequence[VQAXItem], fraction: float, seed: int) -> list[Any]:
    """The pool questions SFT at ``fraction`` trains on, each with all its gold rationales."""
    from illume.training.snapshot import JudgedItem

    chosen = seeded_order(pool, seed, "sft")[: max(1, round(fraction * len(pool)))]
    return [
        JudgedItem(
            item_id=item.question_id,
            image=str(item.image_path),
            question=item.question,
            answer=item.answer,
            accepted=tuple(item.explanations),
            answer_correct=True,
        )
        for item in chosen
    ]


def _run_sft(spec: RunSpec, ctx: StudyContext, record: dict[str, Any], out: Path) -> None:
    from illume.training.replay import replay_items
    from illume.training.round import train_round
    from illume.training.snapshot import build_snapshot

    loop = ctx.study.loop
    world = ctx.world(spec.seed)
    judged = sft_judged(ctx.pool(world, spec.seed), spec.sft_fraction(), spec.seed)
    snapshot = build_snapshot(
        judged, loop.snapshot.model_copy(update={"seed": spec.seed}), replay_items(world["train"])
    )
    adapter_dir = out / "adapter"
    trained_marker = out / "train.json"
    if trained_marker.is_file():
        trained = json.loads(trained_marker.read_text())
    else:
        result = train_round(
            snapshot,
            loop.train.model_copy(update={"seed": spec.seed}),
            model_dir=ctx.model_dir,
            out_dir=adapter_dir,
        )
        trained = {"loss": result.final_loss, "seconds": result.seconds}
        write_atomically(trained_marker, json.dumps(trained))
    record["seconds"]["train"] = trained["seconds"]
    t0 = time.perf_counter()
    val = _measure(adapter_dir, world["val"], ctx, spec.seed)
    record["seconds"]["eval"] = time.perf_counter() - t0
    record["rounds"] = [
        {
            "round": 0,
            "judged_questions_so_far": 0,
            "judged_candidates_so_far": 0,
            "gold_questions": len(judged),
            "rationale_rows": snapshot.rationale_rows,
            "answer_rows": snapshot.answer_rows,
            "rationale_loss_weight": snapshot.rationale_loss_weight,
            "trained": True,
            "train_loss": trained["loss"],
            "seconds": {"sample": 0.0, "train": trained["seconds"], "eval": record["seconds"]["eval"]},
            "val": val,
        }
    ]
    save_record(record, ctx)
    t0 = time.perf_counter()
    record["test"] = _measure(adapter_dir, world["test"], ctx, spec.seed) if world["test"] else None
    record["seconds"]["test"] = time.perf_counter() - t0


def _run_illume(spec: RunSpec, ctx: StudyContext, record: dict[str, Any], out: Path) -> None:
    from illume.training.loop import run_loop

    config = spec.loop_config(ctx.study)
    world = ctx.world(spec.seed)
    pool = ctx.pool(world, spec.seed)
    rounds: list[dict[str, Any]] = []
    totals = [0, 0]

    def add_round(r: LoopRound) -> None:
        totals[0] += r.feedback
        totals[1] += r.candidates
        rounds.append(round_entry(r, (totals[0], totals[1])))
        for phase in ("sample", "train", "eval"):
            record["seconds"][phase] = sum(x["seconds"][phase] for x in rounds)
        record["rounds"] = list(rounds)
        record["load_average"].append(round(os.getloadavg()[0], 2))
        save_record(record, ctx)
        if ctx.progress:
            ctx.log(f"{spec.name} round {r.round}: {_brief(r.val)}")

    result = run_loop(
        ctx.model_dir,
        pool,
        world["val"],
        config,
        out_dir=out,
        progress=False,
        log=lambda line: None,
        replay_from=world["train"],
        resume=True,
        on_round=add_round,
    )
    record["stopped_early"] = result.stopped_early
    final = next((r for r in reversed(result.rounds) if r.trained), None)
    t0 = time.perf_counter()
    adapter_dir = Path(final.adapter_dir) if final and final.adapter_dir else None
    record["test"] = _measure(adapter_dir, world["test"], ctx, spec.seed) if world["test"] else None
    record["seconds"]["test"] = time.perf_counter() - t0


def _brief(val: dict[str, Any]) -> str:
    q = val["acceptance_per_question"].get("fact", 0.0)
    c = val["acceptance_per_candidate"].get("fact", 0.0)
    return f"fact acc/q {100 * q:.1f}% acc/cand {100 * c:.2f}% answers {100 * val['answer_accuracy']:.1f}%"


def run_study_run(spec: RunSpec, ctx: StudyContext) -> dict[str, Any]:
    """Run ``spec`` (or return its finished record); see the module docstring."""
    existing = load_record(ctx.records / f"{spec.name}.json")
    if existing is not None and existing.get("finished"):
        ctx.log(f"{spec.name}: finished before, not run again")
        return existing
    out = ctx.work / "runs" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    config = (
        spec.loop_config(ctx.study).model_dump(mode="json")
        if spec.family == "illume"
        else {"sft_fraction": spec.sft_fraction()} | ctx.study.loop.model_dump(mode="json")
        if spec.family == "sft"
        else ctx.study.loop.model_dump(mode="json")
    )
    record = new_record(spec, ctx, config)
    started = time.perf_counter()
    if spec.family == "base":
        _run_base(spec, ctx, record)
    elif spec.family == "sft":
        _run_sft(spec, ctx, record, out)
    else:
        _run_illume(spec, ctx, record, out)
    record["seconds"]["total"] = time.perf_counter() - started
    record["load_average"].append(round(os.getloadavg()[0], 2))
    record["finished"] = True
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save_record(record, ctx)
    ctx.log(f"{spec.name}: finished in {record['seconds']['total']:.0f} s")
    return record


__all__ = [
    "RunSpec",
    "StudyConfig",
    "StudyContext",
    "load_record",
    "parse_run",
    "run_study_run",
    "sft_judged",
    "study_grid",
]
