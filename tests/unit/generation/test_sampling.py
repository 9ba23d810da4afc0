"""``RowSampler``: a row's draws depend only on its own logits, parameters and seed."""

from __future__ import annotations

import torch

from illume.generation.hf_engine import shared_prefix_length
from illume.generation.sampling import RowSampler, RowSpec, candidate_seed

VOCAB, EOS = 64, 3


def _rows() -> list[RowSpec]:
    return [
        RowSpec(temperature=0.8, top_k=10, top_p=1.0, max_new_tokens=5, seed=candidate_seed(7, 0)),
        RowSpec(temperature=2.0, top_k=60, top_p=0.9, max_new_tokens=3, seed=candidate_seed(7, 1)),
        RowSpec(temperature=0.0, top_k=10, top_p=1.0, max_new_tokens=4, seed=candidate_seed(7, 2)),
        RowSpec(
            temperature=1.3,
            top_k=25,
            top_p=1.0,
            max_new_tokens=6,
            seed=candidate_seed(7, 3),
            min_new_tokens=2,
        ),
    ]


def _run(rows: list[RowSpec], keep: list[int], steps: int = 6) -> dict[int, list[int]]:
    """Tokens of the rows in ``keep`` over ``steps`` steps, logits fixed per (row, step)."""
    sampler = RowSampler(rows, EOS, VOCAB, banned_token_ids=[0, 1, 2, EOS])
    out: dict[int, list[int]] = {i: [] for i in keep}
    for step in range(steps):
        active = [i for i in keep if not sampler.finished[i]]
        if not active:
            break
        scores = torch.stack(
            [torch.randn(VOCAB, generator=torch.Generator().manual_seed(100 * i + step)) for i in active]
        )
        for i, token in zip(active, sampler.choose(scores, active, step).tolist(), strict=True):
            if not sampler.finished[i]:
                out[i].append(token)
    return out


def test_a_row_draws_the_same_alone_or_beside_any_rows():
    rows = _rows()
    together = _run(rows, [0, 1, 2, 3])
    for i in range(len(rows)):
        assert _run(rows, [i]) == {i: together[i]}
    assert len({tuple(t) for t in together.values()}) == len(rows)


def test_banned_tokens_min_and_max_new_tokens():
    rows = _rows()
    out = _run(rows, [0, 1, 2, 3], steps=10)
    assert all(t not in (0, 1, 2) for tokens in out.values() for t in tokens)
    assert all(len(out[i]) <= rows[i].max_new_tokens for i in out)
    sampler = RowSampler([rows[3]], EOS, VOCAB)
    eos_first = torch.full((1, VOCAB), -10.0)
    eos_first[0, EOS] = 10.0
    assert sampler.choose(eos_first, [0], 0).item() != EOS  # held back below min_new_tokens
    assert sampler.choose(eos_first, [0], 2).item() == EOS and sampler.finished[0]


def test_as_a_logits_processor_it_forces_the_chosen_token():
    rows = _rows()
    sampler, reference = RowSampler(rows, EOS, VOCAB), RowSampler(rows, EOS, VOCAB)
    scores = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(0))
    forced = sampler(torch.zeros(len(rows), 9, dtype=torch.long), scores)
    chosen = reference.choose(scores, range(len(rows)), 0)
    assert forced.argmax(dim=-1).tolist() == chosen.tolist()
    assert torch.isfinite(forced).sum().item() == len(rows)


def test_shared_prefix_length():
    assert shared_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert shared_prefix_length([1, 2], [1, 2, 3]) == 2
    assert shared_prefix_length([], [1]) == 0
