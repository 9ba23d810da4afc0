"""Request validation as core types.

Servers hand raw client values to ``build_generate_request``; it applies the defaults (the paper's
sampling settings), checks every limit and returns a ``GenerateRequest`` with a decoded image, or
raises ``InvalidRequest`` with a one-line reason that servers map to INVALID_ARGUMENT.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from pydantic import BaseModel, Field

from illume.errors import InvalidRequest
from illume.generation.generator import GenerateRequest, SamplingParams
from illume.images import ImageLimits, decode_image, image_sha256

PAPER_TEMPERATURES = (0.3, 0.9)
PAPER_TOP_K_FRACTION = 0.1
PAPER_MAX_NEW_TOKENS = 100
MAX_SEED = 2**63 - 1


class RequestLimits(BaseModel):
    """Limits and defaults applied to every Generate request."""

    image: ImageLimits = Field(default_factory=ImageLimits, description="Image decoding limits.")
    max_question_chars: int = Field(1000, gt=0, description="Longest accepted question.")
    max_answer_chars: int = Field(200, gt=0, description="Longest accepted answer.")
    max_candidates: int = Field(64, gt=0, description="Largest n a client may ask for.")
    max_temperatures: int = Field(8, gt=0, description="Most distinct temperatures in one request.")
    max_temperature: float = Field(2.0, gt=0, description="Highest accepted temperature.")
    max_new_tokens: int = Field(256, gt=0, description="Largest max_new_tokens a client may ask for.")
    max_namespace_chars: int = Field(64, gt=0, description="Longest namespace name.")
    default_candidates: int = Field(10, gt=0, description="n when the client leaves it at 0.")
    default_temperatures: tuple[float, ...] = Field(
        PAPER_TEMPERATURES, description="Temperatures by default."
    )
    default_top_k_fraction: float = Field(
        PAPER_TOP_K_FRACTION, gt=0, le=1, description="Top-k share by default."
    )
    default_max_new_tokens: int = Field(PAPER_MAX_NEW_TOKENS, gt=0, description="max_new_tokens by default.")


def _text(value: str, name: str, limit: int, required: bool) -> str:
    text = (value or "").strip()
    if required and not text:
        raise InvalidRequest(f"{name} is required")
    if len(text) > limit:
        raise InvalidRequest(f"{name} is {len(text)} characters; the limit is {limit}")
    if any(ord(ch) < 32 and ch not in "\t" for ch in text):
        raise InvalidRequest(f"{name} contains control characters")
    return text


def build_sampling(
    limits: RequestLimits,
    n: int = 0,
    temperatures: Sequence[float] = (),
    top_k_fraction: float = 0.0,
    top_p: float = 0.0,
    max_new_tokens: int = 0,
    seed: int | None = None,
    min_new_tokens: int = 0,
) -> SamplingParams:
    """Fill in defaults (0 or empty means default) and check the sampling parameters."""
    n = n or limits.default_candidates
    if not 1 <= n <= limits.max_candidates:
        raise InvalidRequest(f"n must be between 1 and {limits.max_candidates}")
    # With default temperatures a small n samples at the first n of them; explicit ones must fit n.
    temps = tuple(float(t) for t in temperatures) or limits.default_temperatures[:n]
    if len(temps) > limits.max_temperatures:
        raise InvalidRequest(f"at most {limits.max_temperatures} temperatures are accepted")
    for t in temps:
        if not 0.0 <= t <= limits.max_temperature or t != t:
            raise InvalidRequest(f"temperature {t} is outside [0, {limits.max_temperature}]")
    if len(temps) > n:
        raise InvalidRequest(f"n ({n}) must be at least the number of temperatures ({len(temps)})")
    top_k_fraction = float(top_k_fraction) or limits.default_top_k_fraction
    if not 0.0 < top_k_fraction <= 1.0:
        raise InvalidRequest("top_k_fraction must be in (0, 1]")
    top_p = float(top_p) or 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]")
    max_new_tokens = max_new_tokens or limits.default_max_new_tokens
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens must be between 1 and {limits.max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise InvalidRequest("min_new_tokens must be between 0 and max_new_tokens")
    if seed is None:
        seed = secrets.randbelow(MAX_SEED)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}")
    return SamplingParams(
        n=n,
        temperatures=temps,
        top_k_fraction=top_k_fraction,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        min_new_tokens=min_new_tokens,
    )


def validate_namespace(namespace: str, limits: RequestLimits) -> str:
    """An empty namespace is "default"; names are short identifiers."""
    name = (namespace or "").strip() or "default"
    if len(name) > limits.max_namespace_chars or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidRequest("namespace must be 1-64 characters of letters, digits, '-', '_' or '.'")
    return name


def build_generate_request(
    limits: RequestLimits,
    image: bytes,
    question: str,
    answer: str | None = None,
    sampling: SamplingParams | None = None,
    adapter: str | None = None,
) -> GenerateRequest:
    """Validate raw client values into a ``GenerateRequest`` (the image decoded)."""
    question = _text(question, "question", limits.max_question_chars, required=True)
    if answer is not None:
        answer = _text(answer, "answer", limits.max_answer_chars, required=True)
    decoded = decode_image(image, limits.image)
    return GenerateRequest(
        image=decoded,
        question=question,
        answer=answer,
        sampling=sampling or build_sampling(limits),
        adapter=adapter or None,
        image_sha256=image_sha256(image),
    )


def validate_pool_item(
    limits: RequestLimits, image: bytes, question: str, answer: str, index: int
) -> tuple[str, str]:
    """A pool item's question and answer as Generate would take them (the image decoded once to
    check it); ``InvalidRequest`` names the item's index."""
    try:
        question = _text(question, "question", limits.max_question_chars, required=True)
        answer = _text(answer, "answer", limits.max_answer_chars, required=False)
        decode_image(image, limits.image)
    except InvalidRequest as error:
        raise InvalidRequest(f"pool item {index}: {error.reason}") from None
    return question, answer
