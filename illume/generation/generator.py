"""Batched ILLUME generation: answers, then candidate rationales, for many requests at once.

Contract (docs/ARCHITECTURE.md, "ILLUME generation"):
- a request without an answer is first answered greedily from ``Q: {question} A:``;
- candidates continue ``Q: {question} A: {answer}, seeing that``; only the continuation is kept;
- sampling keeps the top ``top_k_fraction`` of the vocabulary, then applies the temperature (and an
  optional top-p); ``n`` candidates are split evenly across the temperatures; generation stops at
  EOS or ``max_new_tokens``; exact duplicates (after stripping) and empty continuations are dropped,
  keeping the first occurrence;
- every candidate draws its random numbers from its own generator seeded by (request seed,
  candidate index), so a request gives the same candidates whether it runs alone or in a batch
  with others that differ in every parameter and adapter;
- one ``generate`` call serves the whole batch (requests x candidates); with peft adapters loaded,
  each row names its adapter (``adapter_names``), so one batch may mix adapters and the base model.

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

from illume.generation.prompts import answer_prompt, clean_answer, rationale_prompt
from illume.models.loading import LoadedModel

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
SEED_STRIDE = 1_000_003
ANSWER_MAX_NEW_TOKENS = 10


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
class _Row:
    """One sequence of the batched generate call."""

    request: int
    prompt: str
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int
    adapter: str | None
    min_new_tokens: int = 0


def candidate_seed(seed: int, index: int) -> int:
    """The seed of candidate ``index`` of a request seeded with ``seed``."""
    return (seed * SEED_STRIDE + index) % (2**63 - 1)


def top_k_count(fraction: float, vocab_size: int) -> int:
    """How many tokens top-k keeps for a fraction of the vocabulary (at least one)."""
    return max(1, min(vocab_size, round(fraction * vocab_size)))


class RowSampler:
    """A logits processor that samples each row with its own parameters and generator.

    It returns scores where only the chosen token is finite, so ``generate`` in greedy mode takes
    exactly the token this sampler drew. A row that reaches its own ``max_new_tokens`` is given EOS.
    """

    def __init__(
        self, rows: Sequence[_Row], eos_token_id: int, vocab_size: int, banned_token_ids: Sequence[int] = ()
    ) -> None:
        self.rows = rows
        self.eos = eos_token_id
        self.vocab_size = vocab_size
        self.banned = torch.tensor(
            [t for t in banned_token_ids if t != eos_token_id and t < vocab_size], dtype=torch.long
        )
        self.generators = [torch.Generator().manual_seed(row.seed) for row in rows]
        self.prompt_length: int | None = None
        self.finished = [False] * len(rows)
        self.truncated = [False] * len(rows)
        self.tokens = [0] * len(rows)
        self.logprob_sums = [0.0] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        logits = scores.float()[:, : self.vocab_size].cpu()
        if len(self.banned):
            # Special tokens (image, padding, BOS) are never part of a rationale.
            logits[:, self.banned] = float("-inf")
        too_short = [i for i, row in enumerate(self.rows) if step < row.min_new_tokens]
        if too_short:
            logits[too_short, self.eos] = float("-inf")
        chosen = torch.empty(len(self.rows), dtype=torch.long)
        logprobs = torch.zeros(len(self.rows))
        greedy = [i for i, r in enumerate(self.rows) if r.temperature <= 0 or r.top_k == 1]
        sampled = [i for i in range(len(self.rows)) if i not in set(greedy)]
        if greedy:
            index = torch.tensor(greedy)
            chosen[index] = logits[index].argmax(dim=-1)
        if sampled:
            self._sample(logits, sampled, chosen, logprobs)
        for i, row in enumerate(self.rows):
            if self.finished[i]:
                continue
            if step >= row.max_new_tokens:
                chosen[i] = self.eos
                self.truncated[i] = True
            if int(chosen[i]) == self.eos:
                self.finished[i] = True
            else:
                self.tokens[i] += 1
                self.logprob_sums[i] += float(logprobs[i])
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(self.rows)), chosen.to(scores.device)] = 0.0
        return forced

    def _sample(
        self, logits: torch.Tensor, rows: list[int], chosen: torch.Tensor, logprobs: torch.Tensor
    ) -> None:
        index = torch.tensor(rows)
        k_max = max(self.rows[i].top_k for i in rows)
        values, tokens = logits[index].topk(k_max, dim=-1)
        ks = torch.tensor([self.rows[i].top_k for i in rows])
        keep = torch.arange(k_max).unsqueeze(0) < ks.unsqueeze(1)
        temps = torch.tensor([self.rows[i].temperature for i in rows]).unsqueeze(1)
        scaled = (values / temps).masked_fill(~keep, float("-inf"))
        probs = scaled.softmax(dim=-1)
        top_p = torch.tensor([self.rows[i].top_p for i in rows]).unsqueeze(1)
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        uniforms = torch.cat([torch.rand(1, generator=self.generators[i], dtype=torch.float64) for i in rows])
        cdf = probs.double().cumsum(dim=-1)
        picks = torch.searchsorted(cdf, uniforms.unsqueeze(1) * cdf[:, -1:]).squeeze(1).clamp(max=k_max - 1)
        # Guard against landing on a zero-probability tail slot through rounding.
        picks = torch.where(
            probs.gather(1, picks.unsqueeze(1)).squeeze(1) > 0, picks, torch.zeros_like(picks)
        )
        chosen[index] = tokens.gather(1, picks.unsqueeze(1)).squeeze(1)
        logprobs[index] = probs.gather(1, picks.unsqueeze(1)).squeeze(1).log()


class Generator:
    """Runs ILLUME generation for batches of requests on one loaded model."""

    def __init__(self, loaded: LoadedModel, answer_max_new_tokens: int = ANSWER_MAX_NEW_TOKENS) -> None:
        self.loaded = loaded
        self.answer_max_new_tokens = answer_max_new_tokens
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
            answers = self._answers(requests)
            rows = self._rationale_rows(requests, answers)
            texts, sampler = self._run(rows, [requests[r.request].image for r in rows])
        results = []
        for i, request in enumerate(requests):
            candidates = self._collect(i, rows, texts, sampler)
            results.append(
                GenerateResult(
                    answer=answers[i],
                    answer_generated=request.answer is None,
                    seed=request.sampling.seed,
                    adapter=request.adapter,
                    candidates=candidates,
                )
            )
        return results

    def _check_adapters(self, requests: Sequence[GenerateRequest]) -> None:
        installed = set(self.adapter_names())
        for request in requests:
            if request.adapter is not None and request.adapter not in installed:
                raise KeyError(f"adapter {request.adapter!r} is not loaded")

    def _answers(self, requests: Sequence[GenerateRequest]) -> list[str]:
        pending = [i for i, r in enumerate(requests) if r.answer is None]
        answers = [r.answer or "" for r in requests]
        if not pending:
            return answers
        rows = [
            _Row(
                i,
                answer_prompt(requests[i].question),
                0.0,
                1,
                1.0,
                self.answer_max_new_tokens,
                0,
                requests[i].adapter,
            )
            for i in pending
        ]
        texts, _ = self._run(rows, [requests[i].image for i in pending])
        for row, text in zip(rows, texts, strict=True):
            answers[row.request] = clean_answer(text)
        return answers

    def _rationale_rows(self, requests: Sequence[GenerateRequest], answers: list[str]) -> list[_Row]:
        rows = []
        vocab = self.loaded.vocab_size
        for i, request in enumerate(requests):
            s = request.sampling
            prompt = rationale_prompt(request.question, answers[i])
            for index, temperature in enumerate(s.temperature_plan()):
                rows.append(
                    _Row(
                        i,
                        prompt,
                        temperature,
                        top_k_count(s.top_k_fraction, vocab),
                        s.top_p,
                        s.max_new_tokens,
                        candidate_seed(s.seed, index),
                        request.adapter,
                        min(s.min_new_tokens, s.max_new_tokens),
                    )
                )
        return rows

    def _encode(self, rows: Sequence[_Row], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        placeholder = self.loaded.image_placeholder
        texts = [placeholder + row.prompt for row in rows]
        batch_images: list[Any] = [[img] for img in images] if self.loaded.nested_images else list(images)
        encoded = self.loaded.processor(text=texts, images=batch_images, return_tensors="pt", padding=True)
        return {
            k: v.to(self.loaded.device, dtype=self.loaded.dtype)
            if v.is_floating_point()
            else v.to(self.loaded.device)
            for k, v in encoded.items()
        }

    def _run(self, rows: Sequence[_Row], images: Sequence[Image.Image]) -> tuple[list[str], RowSampler]:
        """One generate call for all rows; returns the decoded continuations and the sampler's records."""
        from transformers import GenerationConfig, LogitsProcessorList

        tokenizer = self.loaded.tokenizer
        inputs = self._encode(rows, images)
        sampler = RowSampler(rows, tokenizer.eos_token_id, self.loaded.vocab_size, tokenizer.all_special_ids)
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(r.max_new_tokens for r in rows) + 1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        kwargs: dict[str, Any] = {}
        if self.adapter_names():
            kwargs["adapter_names"] = [r.adapter or BASE_ADAPTER for r in rows]
        output = self.model.generate(
            **inputs, generation_config=config, logits_processor=LogitsProcessorList([sampler]), **kwargs
        )
        continuation = output[:, inputs["input_ids"].shape[1] :]
        texts = [
            tokenizer.decode(seq[: sampler.tokens[i]], skip_special_tokens=True).strip()
            for i, seq in enumerate(continuation.tolist())
        ]
        return texts, sampler

    @staticmethod
    def _collect(
        request: int, rows: Sequence[_Row], texts: list[str], sampler: RowSampler
    ) -> list[CandidateOut]:
        seen: set[str] = set()
        out: list[CandidateOut] = []
        for i, row in enumerate(rows):
            if row.request != request or not texts[i] or texts[i] in seen:
                continue
            seen.add(texts[i])
            tokens = sampler.tokens[i]
            out.append(
                CandidateOut(
                    index=len(out),
                    text=texts[i],
                    temperature=row.temperature,
                    token_count=tokens,
                    finish_reason="length" if sampler.truncated[i] else "eos",
                    mean_logprob=sampler.logprob_sums[i] / tokens if tokens else 0.0,
                )
            )
        return out


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split ``items`` into consecutive chunks of at most ``size`` (for bounded batches)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))] if items else []


__all__ = [
    "BASE_ADAPTER",
    "CandidateOut",
    "GenerateRequest",
    "GenerateResult",
    "Generator",
    "SamplingParams",
    "candidate_seed",
    "chunked",
    "top_k_count",
]
