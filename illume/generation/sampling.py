"""Per-row sampling: each candidate row draws with its own parameters and its own random generator.

Contract (docs/ARCHITECTURE.md, "ILLUME generation"):
- special tokens other than EOS are never chosen; EOS is held back until ``min_new_tokens``;
- a greedy row (temperature 0 or top-k of one) takes the arg-max; a sampled row keeps its top-k
  logits, divides by its temperature, applies top-p and draws one float64 uniform from its own
  ``torch.Generator`` seeded with the row's seed;
- a row that reaches its ``max_new_tokens`` is given EOS (finish reason "length");
- what a row draws depends only on its own logits and its own generator: never on which other
  rows share the batch, are still running or have been dropped (sampled rows are grouped by top-k
  so a neighbour's larger k never changes the shape of a row's softmax).

``RowSampler.choose`` serves any decode loop that passes the scores of the rows still running;
``RowSampler.__call__`` is the same sampler as a Hugging Face logits processor over all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class RowSpec:
    """How one candidate row samples."""

    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int
    min_new_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


GREEDY_ROW = RowSpec(temperature=0.0, top_k=1, top_p=1.0, max_new_tokens=1, seed=0)


def candidate_seed(seed: int, index: int) -> int:
    """The seed of candidate ``index`` of a request seeded with ``seed``."""
    return (seed * SEED_STRIDE + index) % (2**63 - 1)


def top_k_count(fraction: float, vocab_size: int) -> int:
    """How many tokens top-k keeps for a fraction of the vocabulary (at least one)."""
    return max(1, min(vocab_size, round(fraction * vocab_size)))


class RowSampler:
    """Chooses the next token of every row and keeps each row's record (tokens, log-probabilities)."""

    def __init__(
        self,
        rows: Sequence[RowSpec],
        eos_token_id: int,
        vocab_size: int,
        banned_token_ids: Sequence[int] = (),
    ) -> None:
        self.rows = list(rows)
        self.eos = eos_token_id
        self.vocab_size = vocab_size
        self.banned = torch.tensor(
            [t for t in banned_token_ids if t != eos_token_id and t < vocab_size], dtype=torch.long
        )
        self.generators = [torch.Generator().manual_seed(row.seed) for row in self.rows]
        self.finished = [False] * len(self.rows)
        self.truncated = [False] * len(self.rows)
        self.tokens = [0] * len(self.rows)
        self.logprob_sums = [0.0] * len(self.rows)
        self._prompt_length: int | None = None

    def choose(self, scores: torch.Tensor, active: Sequence[int], step: int) -> torch.Tensor:
        """The token of each row in ``active`` (scores row ``j`` belongs to row ``active[j]``) at ``step``.

        Rows already finished still get a token (EOS is as good as any) but their record is kept.
        """
        # A copy: the masks below must never write into the caller's scores (a prefill's logits).
        logits = scores[:, : self.vocab_size].to("cpu", torch.float32, copy=True)
        if len(self.banned):
            # Special tokens (image, padding, BOS) are never part of a rationale.
            logits[:, self.banned] = float("-inf")
        too_short = [j for j, i in enumerate(active) if step < self.rows[i].min_new_tokens]
        if too_short:
            logits[too_short, self.eos] = float("-inf")
        chosen = torch.empty(len(active), dtype=torch.long)
        logprobs = torch.zeros(len(active))
        greedy = [j for j, i in enumerate(active) if self.rows[i].greedy]
        if greedy:
            chosen[greedy] = logits[greedy].argmax(dim=-1)
        by_k: dict[int, list[int]] = {}
        for j, i in enumerate(active):
            if not self.rows[i].greedy:
                by_k.setdefault(self.rows[i].top_k, []).append(j)
        for k, group in by_k.items():
            self._sample(logits, group, [active[j] for j in group], k, chosen, logprobs)
        self._record(active, chosen, logprobs, step)
        return chosen

    def _record(self, active: Sequence[int], chosen: torch.Tensor, logprobs: torch.Tensor, step: int) -> None:
        for j, i in enumerate(active):
            if self.finished[i]:
                continue
            if step >= self.rows[i].max_new_tokens:
                chosen[j] = self.eos
                self.truncated[i] = True
            if int(chosen[j]) == self.eos:
                self.finished[i] = True
            else:
                self.tokens[i] += 1
                self.logprob_sums[i] += float(logprobs[j])

    def _sample(
        self,
        logits: torch.Tensor,
        positions: list[int],
        rows: list[int],
        k: int,
        chosen: torch.Tensor,
        logprobs: torch.Tensor,
    ) -> None:
        """Sample rows sharing one top-k: ``positions`` index ``logits``, ``rows`` the row records."""
        index = torch.tensor(positions)
        k = min(k, logits.shape[-1])
        values, tokens = logits[index].topk(k, dim=-1)
        temps = torch.tensor([self.rows[i].temperature for i in rows]).unsqueeze(1)
        probs = (values / temps).softmax(dim=-1)
        top_p = torch.tensor([self.rows[i].top_p for i in rows]).unsqueeze(1)
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        uniforms = torch.cat([torch.rand(1, generator=self.generators[i], dtype=torch.float64) for i in rows])
        cdf = probs.double().cumsum(dim=-1)
        picks = torch.searchsorted(cdf, uniforms.unsqueeze(1) * cdf[:, -1:]).squeeze(1).clamp(max=k - 1)
        # Guard against landing on a zero-probability tail slot through rounding.
        picked = probs.gather(1, picks.unsqueeze(1)).squeeze(1)
        picks = torch.where(picked > 0, picks, torch.zeros_like(picks))
        chosen[index] = tokens.gather(1, picks.unsqueeze(1)).squeeze(1)
        logprobs[index] = probs.gather(1, picks.unsqueeze(1)).squeeze(1).log()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """As a logits processor of ``generate`` in greedy mode: only the chosen token stays finite."""
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        chosen = self.choose(scores, range(len(self.rows)), input_ids.shape[1] - self._prompt_length)
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(self.rows)), chosen.to(scores.device)] = 0.0
        return forced
