"""Derived seeds: stable across calls, below 2**48, different for different labels and parts."""

from __future__ import annotations

import hashlib

from illume.seeds import derived_seed


def test_a_derived_seed_is_the_sha256_of_its_parts_and_fits_every_seed_field():
    assert derived_seed("illume-eval", 7, "q1") == int.from_bytes(
        hashlib.sha256(b"illume-eval/7/q1").digest()[:6], "big"
    )
    seeds = {derived_seed(label, s, q) for label in ("a", "b") for s in (0, 1) for q in ("x", "y")}
    assert len(seeds) == 8 and all(0 <= seed < 2**48 for seed in seeds)
