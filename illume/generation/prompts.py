"""ILLUME's prompt strings, exactly as in the paper's code.

The answer step asks ``Q: {question} A:`` and decodes (near) greedily; the rationale step puts the
answer into the prompt and lets the model continue after ``seeing that``. Only the continuation
is a candidate rationale.
"""

from __future__ import annotations

from collections.abc import Sequence

RATIONALE_MARKER = "seeing that"


def answer_prompt(question: str) -> str:
    """The prompt that asks the model for an answer."""
    return f"Q: {question} A:"


def rationale_prompt(question: str, answer: str) -> str:
    """The prompt whose continuation is a rationale for ``answer``."""
    return f"Q: {question} A: {answer}, {RATIONALE_MARKER}"


def clean_answer(continuation: str) -> str:
    """The model's answer: the continuation up to the first comma or period, stripped."""
    for stop in (",", ".", "\n"):
        continuation = continuation.split(stop, 1)[0]
    return continuation.strip()


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common (where a prompt's encoding ends
    inside a longer encoding that continues it)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
