"""Batched ILLUME generation: answers, then candidate rationales, for many requests at once.

Contract (docs/ARCHITECTURE.md, "ILLUME generation"):
- a request without an answer is first answered greedily from ``Q: {question} A:`` (at most
  ``answer_max_new_tokens`` tokens, cut at the first comma or period);
- candidates continue ``Q: {question} A: {answer}, seeing that``; only the continuation is kept;
- sampling keeps the top ``top_k_fraction`` of the vocabulary, then applies the temperature (and an
  optional top-p); ``n`` candidates are split evenly across the temperatures; generation stops at
  EOS or ``max_new_tokens``; exact duplicates (after stripping) and empty continuations are dropped,
  keeping the first by candidate index, whichever finished first;
- every candidate draws its random numbers from its own generator seeded by (request seed,
  candidate index), so a request gives the same candidates whether it runs alone or in a batch
  with others that differ in every parameter and adapter;
- each request names its adapter (None: the base model); one batch may mix adapters.

The model runs behind an ``Engine`` (``illume.generation.engine``): the Generator prefills each
request's prompt, decodes the answer where needed, prefills the rationale prompt reusing the answer
prompt's state, and decodes the candidates. ``engine="auto"`` forks one prefill per request where
the family allows it (``hf_engine.ForkEngine``) and otherwise repeats the prompt in every row
(``hf_engine.RepeatedRowsEngine``, also selectable as ``"repeated"``).

``Generator.generate`` is synchronous and thread-safe (one batch at a time, under ``lock``); the
serving layer calls it from a worker thread and swaps adapters between batches under the same lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from illume.generation.engine import DecodeJob, Engine, Finished, Prompt, PromptState
from illume.generation.hf_engine import BASE_ADAPTER, ForkEngine, RepeatedRowsEngine, fork_supported
from illume.generation.prompts import answer_prompt, clean_answer, rationale_prompt
from illume.generation.sampling import (
    SEED_STRIDE,
    RowSampler,
    RowSpec,
    candidate_seed,
    top_k_count,
)
from illume.models.loading import LoadedModel

ANSWER_MAX_NEW_TOKENS = 10
EngineChoice = Literal["auto", "fork", "repeated"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request (defaults filled in by validation)."""

    n: int = 10
    temperatures: tuple[float, ...] = (0.3, 0.9)
    top_k_fraction: float = 0.1
    top_p: float = 1.0
    max_new_tokens: int = 100
    seed: int = 0
    min_new_tokens: int = 0

    def temperature_plan(self) -> list[float]:
        """The temperature of each candidate index: ``n`` split evenly, earlier temperatures first."""
        count = len(self.temperatures)
        plan: list[float] = []
        for i, temperature in enumerate(self.temperatures):
            plan.extend([temperature] * (self.n // count + (1 if i < self.n % count else 0)))
        return plan


@dataclass(frozen=True)
class GenerateRequest:
    """One validated request: a decoded image, a question, an optional answer, sampling, adapter name."""

    image: Image.Image
    question: str
    answer: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    image_sha256: str = ""


@dataclass(frozen=True)
class CandidateOut:
    """One unique candidate rationale."""

    index: int
    text: str
    temperature: float
    token_count: int
    finish_reason: Literal["eos", "length"]
    mean_logprob: float


@dataclass(frozen=True)
class GenerateResult:
    """The reply to one request."""

    answer: str
    answer_generated: bool
    seed: int
    adapter: str | None
    candidates: list[CandidateOut]


def make_engine(loaded: LoadedModel, choice: EngineChoice) -> Engine:
    """The Hugging Face engine named by ``choice`` ("auto": fork where the family allows it)."""
    if choice == "repeated" or (choice == "auto" and not fork_supported(loaded)):
        return RepeatedRowsEngine(loaded)
    if choice in ("auto", "fork"):
        if not fork_supported(loaded):
            raise ValueError(f"the fork engine does not serve model type {loaded.model_type!r}")
        return ForkEngine(loaded)
    raise ValueError(f"unknown engine {choice!r}; choose auto, fork or repeated")


class Generator:
    """Runs ILLUME generation for batches of requests on one loaded model."""

    def __init__(
        self,
        loaded: LoadedModel,
        answer_max_new_tokens: int = ANSWER_MAX_NEW_TOKENS,
        engine: EngineChoice | Engine = "auto",
    ) -> None:
        self.loaded = loaded
        self.answer_max_new_tokens = answer_max_new_tokens
        self.engine: Engine = make_engine(loaded, engine) if isinstance(engine, str) else engine
        self.lock = threading.RLock()

    @property
    def model(self) -> Any:
        return self.loaded.model

    def adapter_names(self) -> list[str]:
        """Names of the peft adapters currently installed (empty for a plain model)."""
        config = getattr(self.model, "peft_config", None)
        return sorted(config) if config else []

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Answer (where needed) and sample candidates for every request, batched."""
        with self.lock, torch.inference_mode():
            self._check_adapters(requests)
            answers, answer_states = self._answers(requests)
            prompts = [
                Prompt(r.image, rationale_prompt(r.question, answers[i]), r.adapter)
                for i, r in enumerate(requests)
            ]
            states = self.engine.prefill(prompts, reuse=answer_states)
            del answer_states  # the rationale states hold what they need; free the rest before decoding
            plans = [self._rows(r.sampling) for r in requests]
            jobs = [
                DecodeJob(state, [spec for _, spec in plan])
                for state, plan in zip(states, plans, strict=True)
            ]
            finished = list(self.engine.decode(jobs))
        by_request: list[list[Finished]] = [[] for _ in requests]
        for f in sorted(finished, key=lambda f: (f.job, f.row)):
            by_request[f.job].append(f)
        return [
            GenerateResult(
                answer=answers[i],
                answer_generated=request.answer is None,
                seed=request.sampling.seed,
                adapter=request.adapter,
                candidates=_unique_candidates(by_request[i], plans[i]),
            )
            for i, request in enumerate(requests)
        ]

    def _check_adapters(self, requests: Sequence[GenerateRequest]) -> None:
        installed = set(self.adapter_names())
        for request in requests:
            if request.adapter is not None and request.adapter not in installed:
                raise KeyError(f"adapter {request.adapter!r} is not loaded")

    def _answers(self, requests: Sequence[GenerateRequest]) -> tuple[list[str], list[PromptState | None]]:
        """Every request's answer, and the answer prompt's state of those answered here (else None).

        The state is handed to the rationale prefill, which continues from it (one prefill).
        """
        answers = [r.answer or "" for r in requests]
        reuse: list[PromptState | None] = [None] * len(requests)
        pending = [i for i, r in enumerate(requests) if r.answer is None]
        if not pending:
            return answers, reuse
        prompts = [
            Prompt(requests[i].image, answer_prompt(requests[i].question), requests[i].adapter)
            for i in pending
        ]
        states = self.engine.prefill(prompts)
        greedy = RowSpec(
            temperature=0.0, top_k=1, top_p=1.0, max_new_tokens=self.answer_max_new_tokens, seed=0
        )
        for f in self.engine.decode([DecodeJob(state, [greedy]) for state in states]):
            answers[pending[f.job]] = clean_answer(f.text)
        for i, state in zip(pending, states, strict=True):
            reuse[i] = state
        return answers, reuse

    def _rows(self, s: SamplingParams) -> list[tuple[float, RowSpec]]:
        """Each candidate's temperature and sampling row, in candidate-index order."""
        top_k = top_k_count(s.top_k_fraction, self.loaded.vocab_size)
        return [
            (
                temperature,
                RowSpec(
                    temperature=temperature,
                    top_k=top_k,
                    top_p=s.top_p,
                    max_new_tokens=s.max_new_tokens,
                    seed=candidate_seed(s.seed, index),
                    min_new_tokens=min(s.min_new_tokens, s.max_new_tokens),
                ),
            )
            for index, temperature in enumerate(s.temperature_plan())
        ]


def _unique_candidates(
    finished: Sequence[Finished], plan: Sequence[tuple[float, RowSpec]]
) -> list[CandidateOut]:
    """Non-empty, first-by-index-unique candidates of one request (``finished`` in row order)."""
    seen: set[str] = set()
    out: list[CandidateOut] = []
    for f in finished:
        if not f.text or f.text in seen:
            continue
        seen.add(f.text)
        count = len(f.token_ids)
        out.append(
            CandidateOut(
                index=len(out),
                text=f.text,
                temperature=plan[f.row][0],
                token_count=count,
                finish_reason=f.finish_reason,
                mean_logprob=f.logprob_sum / count if count else 0.0,
            )
        )
    return out


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split ``items`` into consecutive chunks of at most ``size`` (for bounded batches)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))] if items else []


__all__ = [
    "BASE_ADAPTER",
    "SEED_STRIDE",
    "CandidateOut",
    "GenerateRequest",
    "GenerateResult",
    "Generator",
    "RowSampler",
    "SamplingParams",
    "candidate_seed",
    "chunked",
    "make_engine",
    "top_k_count",
]
