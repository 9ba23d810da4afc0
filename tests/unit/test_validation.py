"""Request validation: defaults are the paper's; every limit raises InvalidRequest with one line."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from illume.errors import InvalidRequest
from illume.validation import RequestLimits, build_generate_request, build_sampling, validate_namespace

LIMITS = RequestLimits()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_small_n_uses_the_first_default_temperatures():
    assert build_sampling(LIMITS, n=1).temperatures == (0.3,)


def test_defaults_are_the_papers():
    s = build_sampling(LIMITS)
    assert (s.n, s.temperatures, s.top_k_fraction, s.top_p, s.max_new_tokens) == (
        10,
        (0.3, 0.9),
        0.1,
        1.0,
        100,
    )
    assert 0 <= s.seed < 2**63


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 65},
        {"temperatures": [0.5] * 9, "n": 20},
        {"temperatures": [-0.1]},
        {"temperatures": [2.5]},
        {"temperatures": [float("nan")]},
        {"temperatures": [0.3, 0.9, 1.2], "n": 2},
        {"top_k_fraction": 1.5},
        {"top_p": -0.5},
        {"max_new_tokens": 10_000},
        {"seed": -1},
    ],
)
def test_sampling_limits(kwargs):
    with pytest.raises(InvalidRequest) as info:
        build_sampling(LIMITS, **kwargs)
    assert "\n" not in info.value.reason


def test_request_texts():
    request = build_generate_request(LIMITS, _png(), "  what colour is it? ", None)
    assert request.question == "what colour is it?" and request.answer is None
    assert len(request.image_sha256) == 64
    for question, answer in [
        ("", None),
        ("x" * 1001, None),
        ("ok?", ""),
        ("ok?", "a" * 201),
        ("a\x00b", None),
    ]:
        with pytest.raises(InvalidRequest):
            build_generate_request(LIMITS, _png(), question, answer)


def test_namespace():
    assert validate_namespace("", LIMITS) == "default"
    assert validate_namespace("team-a_1", LIMITS) == "team-a_1"
    with pytest.raises(InvalidRequest):
        validate_namespace("a/b", LIMITS)
