"""The ILLUME loop in one process: sample, judge, snapshot, train, evaluate; repeat.

Contract (``run_loop(model_dir, train_items, val_items, config, out_dir=...)``):

- a fixed pool of ``pool_size`` training questions is drawn once (seeded);
- round k (from 0) samples candidates for up to ``feedback_per_round`` pool questions with the
  adapter of round k-1 (the base model at round 0), for the gold answer (``Q: q A: a, seeing
  that``), with the paper's sampling (n, temperatures, top-k 10%); questions that already have an
  accepted rationale are not asked again unless ``resample_accepted``;
- a simulated critic (``fact``: the world's fact checker; ``rouge_l``: the paper's ROUGE-L >= 0.7
  against the gold explanations) judges every candidate; each judged question becomes a
  ``JudgedItem`` and stays in the history (accumulation);
- the snapshot is built from the whole history (``build_snapshot``); with ``replay_pool`` the pool's
  questions that were not judged (their answers are known) top the answer-only rows up to the
  snapshot's ``replay_ratio``, as ILLUME's answer replay does (by default a question with
  rationale rows may give an answer row too: ``replay_explained``, the study's step-3 finding);
  then an adapter is trained on it (``train_round``; from the base model by default, from round
  k-1's adapter with ``train.init_from="parent"``), loaded into the sampling model as ``round-k``
  and evaluated on the validation items (``evaluate_generator``);
- a round whose snapshot has no rationale row trains nothing and keeps the previous adapter;
- the answer-only rows are topped up from ``replay_from`` when it is given (a study's whole train
  split, so that training on every pool question still has answers to replay) instead of the pool;
- every round writes ``out_dir/round-k/{judged.json, snapshot.json, adapter/, eval.json}``, then
  ``round.json`` (its table line) last, and one line of the table (feedback, accepted, rows, val
  acceptance, answer accuracy); ``on_round`` (if given) is called with each round, run or resumed;
- with ``resume`` a round whose ``round.json`` exists is not run again: its judged items, record
  and adapter are read back (the pool order drawn for it is drawn again, so the rounds after it ask
  the same questions as an uninterrupted run would), and the baseline is read from
  ``baseline.json``; a round interrupted before its ``round.json`` is run from its start;
- with ``stop_after_barren_rounds`` N, the loop ends after N rounds in a row that accepted no
  candidate (``LoopResult.stopped_early`` says so).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from illume.critics import Critic, critic_input, make_critic
from illume.data.vqax import VQAXItem
from illume.evaluation.evaluate import EvalReport, evaluate_generator
from illume.generation.generator import GenerateRequest, Generator, SamplingParams, chunked
from illume.images import load_image_file
from illume.seeds import derived_seed
from illume.training.replay import replay_items
from illume.training.round import TrainConfig, load_adapter_model, train_round
from illume.training.snapshot import JudgedItem, SnapshotConfig, build_snapshot

CriticName = Literal["fact", "rouge_l"]


class LoopConfig(BaseModel):
    """Settings of an in-process ILLUME loop."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rounds: int = Field(3, ge=1, description="Tuning rounds.")
    pool_size: int = Field(200, ge=1, description="Training questions in the loop (drawn once, seeded).")
    feedback_per_round: int | None = Field(
        None, ge=1, description="Most questions judged per round (the feedback budget; None: the pool)."
    )
    resample_accepted: bool = Field(
        False, description="Ask again about questions that already have an accepted rationale."
    )
    stop_after_barren_rounds: int | None = Field(
        None, ge=1, description="End the loop after this many rounds in a row with no accepted candidate."
    )
    critic: CriticName = Field("fact", description="The simulated critic that gives the feedback.")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Acceptance threshold of the rouge_l critic.")
    n: int = Field(10, ge=1, description="Candidates per question (the paper's examples: 10).")
    temperatures: tuple[float, ...] = Field((0.3, 0.9), description="Sampling temperatures.")
    top_k_fraction: float = Field(0.1, gt=0, le=1, description="Top-k share of the vocabulary.")
    max_new_tokens: int = Field(100, ge=1, description="Longest candidate, in tokens.")
    batch_size: int = Field(8, ge=1, description="Questions per generate call (sampling and evaluation).")
    val_limit: int | None = Field(100, ge=1, description="Validation items evaluated per round (None: all).")
    eval_critics: tuple[CriticName, ...] = Field(
        ("rouge_l", "fact"), description="Critics of the evaluation."
    )
    eval_n: int = Field(10, ge=1, description="Sampled candidates per validation item.")
    eval_baseline: bool = Field(True, description="Evaluate the base model before round 0.")
    meteor: bool = Field(True, description="Compute METEOR (Java) in evaluations.")
    seed: int = Field(0, description="Seed of the pool draw, the sampling and the snapshots.")
    snapshot: SnapshotConfig = Field(
        default_factory=lambda: SnapshotConfig(replay_explained=True),
        description="Snapshot rules. Answer rows may come from questions with rationale rows too "
        "(replay_explained): the study's step 3 found it the better paper-protocol setting "
        "(docs/STUDY.md); SnapshotConfig's own default, which the served loop uses, keeps it off.",
    )
    replay_pool: bool = Field(
        True,
        description="Top the answer-only rows up from the pool's unjudged questions (answers known).",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    device: str = Field("auto", description="Device of the sampling/evaluation model.")


@dataclass
class LoopRound:
    """One line of the loop's table."""

    round: int
    feedback: int  # questions judged this round
    candidates: int
    accepted_candidates: int
    accepted_questions: int  # judged this round with at least one accepted candidate
    questions_with_rationale: int  # in the pool, all rounds so far
    rationale_rows: int
    answer_rows: int
    rationale_loss_weight: float
    snapshot_sha256: str
    trained: bool
    train_loss: float | None
    train_seconds: float
    sample_seconds: float
    eval_seconds: float
    adapter_dir: str | None
    val: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopResult:
    baseline: dict[str, Any] | None
    rounds: list[LoopRound]
    seconds: float
    stopped_early: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "rounds": [r.to_dict() for r in self.rounds],
            "seconds": self.seconds,
            "stopped_early": self.stopped_early,
        }


# The fields of a loop's JudgedItem (the simulated critic leaves candidates and judgements empty).
_JUDGED_FIELDS = (
    "item_id",
    "image",
    "question",
    "answer",
    "accepted",
    "answer_correct",
    "generation_id",
    "feedback_ids",
    "round",
    "candidates_judged",
)


def save_judged(items: Sequence[JudgedItem], path: Path) -> None:
    """Write a round's judged items (what resuming needs to rebuild the history)."""
    rows = [{name: getattr(item, name) for name in _JUDGED_FIELDS} for item in items]
    write_atomically(path, json.dumps(rows, indent=0))


def load_judged(path: Path) -> list[JudgedItem]:
    return [JudgedItem(**row) for row in json.loads(path.read_text())]


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader (or a resumed run) never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _seed(*parts: object) -> int:
    return derived_seed("illume-loop", *parts)


def val_summary(report: EvalReport) -> dict[str, Any]:
    """The validation numbers one table line shows."""
    o = report.overall
    return {
        "answer_accuracy": o.answer_accuracy,
        "acceptance_per_question": {k: v["per_question"] for k, v in o.acceptance.items()},
        "acceptance_per_candidate": {k: v["per_candidate"] for k, v in o.acceptance.items()},
        "acceptance_greedy": {k: v["greedy"] for k, v in o.acceptance.items()},
        **{k: o.captions[k] for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in o.captions},
    }


def evaluate_with(
    generator: Generator,
    items: Sequence[VQAXItem],
    adapter: str | None,
    config: LoopConfig,
    *,
    seed: int,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
) -> EvalReport:
    """Evaluate ``adapter`` on ``items`` with the loop's evaluation settings (critics, n, sampling)."""
    return evaluate_generator(
        generator,
        items,
        adapter=adapter,
        critics=[make_critic(c, config.rouge_threshold) for c in config.eval_critics],
        n=config.eval_n,
        temperatures=config.temperatures,
        top_k_fraction=config.top_k_fraction,
        max_new_tokens=config.max_new_tokens,
        seed=seed,
        batch_size=config.batch_size,
        meteor=config.meteor,
        progress=progress,
        settings=settings,
    )


def judge_pool(
    generator: Generator,
    items: Sequence[VQAXItem],
    critic: Critic,
    *,
    round_index: int,
    adapter: str | None,
    config: LoopConfig,
) -> list[JudgedItem]:
    """Sample candidates for ``items`` (gold answers) and let ``critic`` judge them."""
    judged: list[JudgedItem] = []
    for chunk in chunked(list(items), config.batch_size):
        requests = [
            GenerateRequest(
                image=load_image_file(item.image_path),
                question=item.question,
                answer=item.answer,
                sampling=SamplingParams(
                    n=config.n,
                    temperatures=tuple(config.temperatures),
                    top_k_fraction=config.top_k_fraction,
                    max_new_tokens=config.max_new_tokens,
                    seed=_seed(config.seed, round_index, item.question_id),
                ),
                adapter=adapter,
            )
            for item in chunk
        ]
        for item, reply in zip(chunk, generator.generate(requests), strict=True):
            texts = [c.text for c in reply.candidates]
            verdicts = critic.judge_all(texts, critic_input(item))
            judged.append(
                JudgedItem(
                    item_id=item.question_id,
                    image=str(item.image_path),
                    question=item.question,
                    answer=item.answer,
                    accepted=tuple(t for t, v in zip(texts, verdicts, strict=True) if v.accepted),
                    answer_correct=True,  # the gold answer is given
                    generation_id=f"round-{round_index}/{item.question_id}",
                    feedback_ids=(f"round-{round_index}/{item.question_id}/{critic.name}",),
                    round=round_index,
                    candidates_judged=len(texts),
                )
            )
    return judged


def _install_adapter(generator: Generator, adapter_dir: Path, name: str, keep: int = 2) -> None:
    """Load an adapter under a new name (never overwriting one); drop the oldest beyond ``keep``."""
    from peft import PeftModel

    with generator.lock:
        if isinstance(generator.model, PeftModel):
            generator.model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
            names = [n for n in generator.adapter_names() if n != name]
            for old in sorted(names, key=lambda n: int(n.rsplit("-", 1)[-1]))[
                : max(0, len(names) - keep + 1)
            ]:
                generator.model.delete_adapter(old)
        else:
            generator.loaded.model = load_adapter_model(generator.model, adapter_dir, adapter_name=name)
        generator.model.eval()


def run_loop(
    model_dir: str | Path,
    train_items: Sequence[VQAXItem],
    val_items: Sequence[VQAXItem],
    config: LoopConfig,
    *,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    replay_from: Sequence[VQAXItem] | None = None,
    resume: bool = False,
    on_round: Callable[[LoopRound], None] | None = None,
) -> LoopResult:
    """Run ``config.rounds`` ILLUME rounds in this process (see the module docstring)."""
    from illume.models import ModelSettings, load_model

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=1))
    generator = Generator(load_model(ModelSettings(path=Path(model_dir), device=config.device)))
    critic = make_critic(config.critic, config.rouge_threshold)
    pool = sorted(train_items, key=lambda i: _seed(config.seed, "pool", i.question_id))[: config.pool_size]
    val = list(val_items)[: config.val_limit] if config.val_limit else list(val_items)
    # Plain paths: the loop trains with the default image loader, which reads them from disk.
    replay = replay_items(pool if replay_from is None else replay_from) if config.replay_pool else []

    def evaluate_now(adapter: str | None) -> EvalReport:
        return evaluate_with(
            generator,
            val,
            adapter,
            config,
            seed=config.seed,
            progress=progress,
            settings={"model": str(model_dir), "adapter": adapter},
        )

    baseline = None
    if config.eval_baseline and resume and (out / "baseline.json").is_file():
        baseline = json.loads((out / "baseline.json").read_text())
    elif config.eval_baseline:
        report = evaluate_now(None)
        baseline = val_summary(report)
        (out / "baseline_eval.json").write_text(json.dumps(report.to_dict(samples=True), indent=1))
        write_atomically(out / "baseline.json", json.dumps(baseline, indent=1))
        log(f"baseline: {format_val(baseline)}")
    log(table_header())
    history: list[JudgedItem] = []
    records: list[LoopRound] = []
    adapter: str | None = None
    adapter_dir: Path | None = None

    def _run_round(k: int, asked: list[VQAXItem]) -> LoopRound:
        nonlocal adapter, adapter_dir
        round_dir = out / f"round-{k}"
        t0 = time.perf_counter()
        judged = judge_pool(generator, asked, critic, round_index=k, adapter=adapter, config=config)
        sample_seconds = time.perf_counter() - t0
        history.extend(judged)
        save_judged(judged, round_dir / "judged.json")
        snapshot = build_snapshot(
            history, config.snapshot.model_copy(update={"seed": config.snapshot.seed + k}), replay
        )
        snapshot.save(round_dir / "snapshot.json")
        trained = snapshot.rationale_rows > 0
        train_loss = None
        train_seconds = 0.0
        if trained:
            result = train_round(
                snapshot,
                config.train,
                None,
                model_dir=model_dir,
                out_dir=round_dir / "adapter",
                parent_adapter=adapter_dir,
            )
            train_loss, train_seconds = result.final_loss, result.seconds
            adapter_dir, adapter = result.adapter_dir, f"round-{k}"
            _install_adapter(generator, adapter_dir, adapter)
        t0 = time.perf_counter()
        report = evaluate_now(adapter)
        eval_seconds = time.perf_counter() - t0
        (round_dir / "eval.json").write_text(json.dumps(report.to_dict(samples=True), indent=1))
        record = LoopRound(
            round=k,
            feedback=len(judged),
            candidates=sum(j.candidates_judged for j in judged),
            accepted_candidates=sum(len(j.accepted) for j in judged),
            accepted_questions=sum(bool(j.accepted) for j in judged),
            questions_with_rationale=len({j.item_id for j in history if j.accepted}),
            rationale_rows=snapshot.rationale_rows,
            answer_rows=snapshot.answer_rows,
            rationale_loss_weight=snapshot.rationale_loss_weight,
            snapshot_sha256=snapshot.sha256,
            trained=trained,
            train_loss=train_loss,
            train_seconds=train_seconds,
            sample_seconds=sample_seconds,
            eval_seconds=eval_seconds,
            adapter_dir=str(adapter_dir) if adapter_dir else None,
            val=val_summary(report),
        )
        write_atomically(round_dir / "round.json", json.dumps(record.to_dict(), indent=1))
        return record

    rng = random.Random(_seed(config.seed, "order"))
    barren = 0
    stopped_early = None
    for k in range(config.rounds):
        round_dir = out / f"round-{k}"
        round_dir.mkdir(exist_ok=True)
        with_rationale = {j.item_id for j in history if j.accepted}
        asked = [i for i in pool if config.resample_accepted or i.question_id not in with_rationale]
        rng.shuffle(asked)
        asked = asked[: config.feedback_per_round] if config.feedback_per_round else asked
        if resume and (round_dir / "round.json").is_file():
            record = LoopRound(**json.loads((round_dir / "round.json").read_text()))
            history.extend(load_judged(round_dir / "judged.json"))
            if record.trained:
                adapter_dir, adapter = round_dir / "adapter", f"round-{k}"
                _install_adapter(generator, adapter_dir, adapter)
            records.append(record)
            log(table_line(record) + "  (resumed)")
        else:
            record = _run_round(k, asked)
            records.append(record)
            log(table_line(record))
        if on_round is not None:
            on_round(record)
        barren = barren + 1 if record.accepted_candidates == 0 else 0
        if config.stop_after_barren_rounds and barren >= config.stop_after_barren_rounds:
            stopped_early = f"{barren} rounds in a row accepted no candidate (after round {k})"
            log(f"stopped: {stopped_early}")
            break
    result = LoopResult(
        baseline=baseline,
        rounds=records,
        seconds=time.perf_counter() - started,
        stopped_early=stopped_early,
    )
    (out / "loop.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


def format_val(val: dict[str, Any]) -> str:
    acc = " ".join(f"{k}/q={100 * v:.1f}%" for k, v in val["acceptance_per_question"].items())
    return (
        f"answer acc={100 * val['answer_accuracy']:.1f}% {acc} ROUGE-L={val.get('ROUGE-L', float('nan')):.1f}"
    )


_COLUMNS = (
    "round",
    "feedback",
    "cands",
    "accepted",
    "acc q",
    "q w/ rat",
    "rat rows",
    "ans rows",
    "weight",
    "loss",
    "train s",
    "val",
)


def table_header() -> str:
    return " ".join(f"{c:>8}" for c in _COLUMNS[:-1]) + "  val"


def table_line(r: LoopRound) -> str:
    loss = f"{r.train_loss:.3f}" if r.train_loss is not None else "-"
    cells = (
        r.round,
        r.feedback,
        r.candidates,
        r.accepted_candidates,
        r.accepted_questions,
        r.questions_with_rationale,
        r.rationale_rows,
        r.answer_rows,
        f"{r.rationale_loss_weight:.2f}",
        loss,
        f"{r.train_seconds:.1f}",
    )
    return " ".join(f"{c!s:>8}" for c in cells) + "  " + format_val(r.val)


__all__ = ["LoopConfig", "LoopResult", "LoopRound", "evaluate_with", "judge_pool", "run_loop"]
