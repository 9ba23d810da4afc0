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

Streaming (``Generator.stream``): the same batch, as events. Every request gets an ``AnswerReady``
(after the answer step, before any of its candidates) and a ``RequestDone``; a request marked
``streamed`` also gets a ``CandidateReady`` as soon as each of its rows ends. Streamed requests
drop duplicates in finish order: a row whose text equals one already sent (or is empty) is
dropped, whatever its candidate index, and indices count the candidates sent so far, so what was
sent is final; rows that end in the same decoding step go in candidate-index order. Their
``RequestDone`` result holds exactly the candidates sent, in that order. Requests not streamed keep
``generate``'s rule (first by candidate index) and indices. The unique texts are the same either
way; only their order (and which of two equal rows is kept) differs. A request whose
``cancelled`` returns True stops: it gets no more events except ``RequestDone`` with no result,
its rationale prompt is not prefilled if the answer step was still running, and the engine drops
its rows from the decode (``ForkEngine``; ``RepeatedRowsEngine`` runs them to the end).

Token budget (``RequestCost``, ``derive_token_budget``): a request's cost is its prompt tokens
(image and text, counted by the processor) plus ``n x max_new_tokens``, plus
``answer_max_new_tokens`` when the model answers first (then the prompt is counted with an empty
answer). This is the KV cache an engine that shares the prompt among its rows holds at most. The
HF engines hold more: ``ForkEngine`` copies the prompt's cache into each row when the decode
starts (``n x prompt`` tokens, left-padded to the batch's longest prompt) and
``RepeatedRowsEngine`` encodes the prompt in every row, so on those engines leave headroom (the
derived budget uses ``memory_fraction`` of the free memory).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
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
# The token budget where the device reports no free memory (CPU, MPS): about 40 LLaVA-1.5-shaped
# requests with the paper's sampling (576 image tokens + ~30 text + 10 x 100 new, ~1,600 each),
# so on CPU the request count (max_batch_size), not the budget, usually bounds a batch.
CPU_TOKEN_BUDGET = 65536
# Share of the free accelerator memory (after the model is loaded) the derived budget may fill
# with KV cache; the rest is for activations, logits and the HF engines' per-row prompt copies.
DEFAULT_MEMORY_FRACTION = 0.5


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


@dataclass(frozen=True)
class RequestCost:
    """The tokens one request may hold in a batch (see the module docstring, "Token budget")."""

    prompt_tokens: int
    n: int
    max_new_tokens: int
    answer_tokens: int = 0  # answer_max_new_tokens when the model answers first, else 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.n * self.max_new_tokens + self.answer_tokens

    def explain(self) -> str:
        """``prompt P + n x max_new_tokens A x B [+ answer C]``, the parts of ``total``."""
        parts = f"prompt {self.prompt_tokens} + n x max_new_tokens {self.n} x {self.max_new_tokens}"
        return parts + (f" + answer {self.answer_tokens}" if self.answer_tokens else "")


def over_budget(cost: RequestCost, budget: int) -> str:
    """The INVALID_ARGUMENT reason for a request that alone exceeds ``budget`` ("" if it fits)."""
    if cost.total <= budget:
        return ""
    return f"request needs {cost.total} tokens ({cost.explain()}); the budget is {budget}"


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes: 2 (keys, values) x layers x kv_heads x head_dim x dtype bytes,
    from the language model's config (a VLM's ``text_config``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim * element


def derive_token_budget(
    loaded: LoadedModel, memory_fraction: float = DEFAULT_MEMORY_FRACTION, free_bytes: int | None = None
) -> int:
    """A token budget from the device's free memory: ``free x memory_fraction / kv_bytes_per_token``
    on CUDA (``torch.cuda.mem_get_info``, read after the model is loaded), else ``CPU_TOKEN_BUDGET``.
    ``free_bytes`` overrides the reading (tests)."""
    if free_bytes is None:
        if loaded.device.type != "cuda":
            return CPU_TOKEN_BUDGET
        free_bytes, _total = torch.cuda.mem_get_info(loaded.device)
    per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
    return max(1, int(free_bytes * memory_fraction) // per_token)


@dataclass(frozen=True)
class AnswerReady:
    """Stream event: request ``request``'s answer is known (sent before any of its candidates)."""

    request: int
    answer: str
    answer_generated: bool


@dataclass(frozen=True)
class CandidateReady:
    """Stream event: a streamed request's row ended as a new unique candidate (final index)."""

    request: int
    candidate: CandidateOut


@dataclass(frozen=True)
class RequestDone:
    """Stream event: every row of the request has ended (``result`` None: it was cancelled)."""

    request: int
    result: GenerateResult | None
    rows_dropped: int = 0  # rows that never ended because the request was cancelled


StreamEvent = AnswerReady | CandidateReady | RequestDone
Cancelled = Callable[[], bool]


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
        # request_cost runs beside a batch: a fast tokenizer's padding state is not thread-safe,
        # so costs are counted with a private copy of the processor, one count at a time.
        self._count_lock = threading.Lock()
        self._counting_processor: Any = None

    @property
    def model(self) -> Any:
        return self.loaded.model

    def adapter_names(self) -> list[str]:
        """Names of the peft adapters currently installed (empty for a plain model)."""
        config = getattr(self.model, "peft_config", None)
        return sorted(config) if config else []

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Answer (where needed) and sample candidates for every request, batched."""
        results: list[GenerateResult | None] = [None] * len(requests)
        for event in self.stream(requests):
            if isinstance(event, RequestDone):
                results[event.request] = event.result
        return [r for r in results if r is not None]

    def stream(
        self,
        requests: Sequence[GenerateRequest],
        streamed: Sequence[bool] | None = None,
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> Iterator[StreamEvent]:
        """``generate`` as events (module docstring, "Streaming"). Consume it to the end, or close
        it, in the thread that started it: it holds ``lock`` while it runs."""
        streamed = list(streamed) if streamed is not None else [False] * len(requests)
        stops = list(cancelled) if cancelled is not None else [None] * len(requests)
        with self.lock, torch.inference_mode():
            self._check_adapters(requests)
            answers, answer_states = self._answers(requests)
            for i, request in enumerate(requests):
                yield AnswerReady(i, answers[i], request.answer is None)
            live = [i for i in range(len(requests)) if not _stopped(stops[i])]
            for i in sorted(set(range(len(requests))) - set(live)):
                yield RequestDone(i, None, rows_dropped=requests[i].sampling.n)
            prompts = [
                Prompt(
                    requests[i].image, rationale_prompt(requests[i].question, answers[i]), requests[i].adapter
                )
                for i in live
            ]
            states = self.engine.prefill(prompts, reuse=[answer_states[i] for i in live])
            del answer_states  # the rationale states hold what they need; free the rest before decoding
            plans = [self._rows(requests[i].sampling) for i in live]
            jobs = [
                DecodeJob(state, [spec for _, spec in plan], stops[i])
                for i, state, plan in zip(live, states, plans, strict=True)
            ]
            collectors = [
                _Collector(i, plans[j], streamed[i], answers[i], requests[i]) for j, i in enumerate(live)
            ]
            for f in self.engine.decode(jobs):
                yield from collectors[f.job].add(f)
            for collector in collectors:
                yield collector.done(_stopped(stops[collector.request]))

    def request_cost(self, request: GenerateRequest) -> RequestCost:
        """What ``request`` holds in a batch (module docstring, "Token budget"); thread-safe."""
        answer = request.answer if request.answer is not None else ""
        text = rationale_prompt(request.question, answer)
        with self._count_lock:
            if self._counting_processor is None:
                self._counting_processor = copy.deepcopy(self.loaded.processor)
            images: Any = [[request.image]] if self.loaded.nested_images else [request.image]
            encoded = self._counting_processor(
                text=[self.loaded.image_placeholder + text], images=images, return_tensors="pt"
            )
        return RequestCost(
            prompt_tokens=int(encoded["input_ids"].shape[1]),
            n=request.sampling.n,
            max_new_tokens=request.sampling.max_new_tokens,
            answer_tokens=self.answer_max_new_tokens if request.answer is None else 0,
        )

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


def _stopped(cancelled: Cancelled | None) -> bool:
    return cancelled is not None and cancelled()


class _Collector:
    """One request's ended rows during a decode: stream events (finish order) and its result."""

    def __init__(
        self,
        request: int,
        plan: Sequence[tuple[float, RowSpec]],
        streamed: bool,
        answer: str,
        original: GenerateRequest,
    ) -> None:
        self.request, self.plan, self.streamed = request, plan, streamed
        self.answer, self.original = answer, original
        self.rows: list[Finished] = []
        self.sent: list[CandidateOut] = []
        self.seen: set[str] = set()

    def add(self, f: Finished) -> Iterator[CandidateReady]:
        self.rows.append(f)
        if not self.streamed or not f.text or f.text in self.seen:
            return
        self.seen.add(f.text)
        candidate = _candidate(f, self.plan, index=len(self.sent))
        self.sent.append(candidate)
        yield CandidateReady(self.request, candidate)

    def done(self, cancelled: bool) -> RequestDone:
        if cancelled:
            return RequestDone(self.request, None, rows_dropped=len(self.plan) - len(self.rows))
        if self.streamed:
            candidates = self.sent
        else:
            candidates = _unique_candidates(sorted(self.rows, key=lambda f: f.row), self.plan)
        result = GenerateResult(
            answer=self.answer,
            answer_generated=self.original.answer is None,
            seed=self.original.sampling.seed,
            adapter=self.original.adapter,
            candidates=candidates,
        )
        return RequestDone(self.request, result)


def _candidate(f: Finished, plan: Sequence[tuple[float, RowSpec]], index: int) -> CandidateOut:
    count = len(f.token_ids)
    return CandidateOut(
        index=index,
        text=f.text,
        temperature=plan[f.row][0],
        token_count=count,
        finish_reason=f.finish_reason,
        mean_logprob=f.logprob_sum / count if count else 0.0,
    )


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
        out.append(_candidate(f, plan, index=len(out)))
    return out


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split ``items`` into consecutive chunks of at most ``size`` (for bounded batches)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))] if items else []


__all__ = [
    "BASE_ADAPTER",
    "CPU_TOKEN_BUDGET",
    "SEED_STRIDE",
    "AnswerReady",
    "CandidateOut",
    "CandidateReady",
    "GenerateRequest",
    "GenerateResult",
    "Generator",
    "RequestCost",
    "RequestDone",
    "RowSampler",
    "SamplingParams",
    "StreamEvent",
    "candidate_seed",
    "chunked",
    "derive_token_budget",
    "kv_bytes_per_token",
    "make_engine",
    "over_budget",
    "top_k_count",
]
