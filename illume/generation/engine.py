"""The engine boundary: what the ``Generator`` asks of whatever runs the model.

The ``Generator`` owns ILLUME's logic (prompts, the answer step, seeds, temperature plans,
duplicates); an ``Engine`` owns the model, its caches and its batching. Two calls:

- ``prefill(prompts, reuse)``: encode each prompt (an image, a text without the image placeholder,
  an adapter or None for the base model) and return one opaque state per prompt. ``reuse[i]``,
  when given, is a state of an earlier prompt of the same request (same image and adapter); the
  engine may continue from the tokens the two prompts share instead of encoding the image again.
  A state is never changed by later calls, so one state may be decoded, or reused, more than once.
- ``decode(jobs)``: for each job (a state and its rows' ``RowSpec``s) sample the rows from the
  end of the state's prompt, each row with its own sampling parameters and random generator, and
  yield every row once as a ``Finished`` as soon as it ends (EOS or its ``max_new_tokens``). The
  order in which rows finish is the engine's; ``(job, row)`` says which row it is.
- Cancellation: a job's ``cancelled``, when given, is polled between decoding steps; once it
  returns True the job's unfinished rows may be dropped (no ``Finished`` for them). An engine
  that cannot drop rows mid-decode may ignore it (the caller discards those rows' results).

What a row produces depends only on its prompt, adapter and ``RowSpec``, never on the other rows
or jobs of the call (up to floating-point rounding on accelerators). Engines run under the
caller's ``Generator.lock``; they are not thread-safe themselves.

Implementations: ``illume.generation.hf_engine`` (``ForkEngine``: one prefill per prompt, forked to
its rows; ``RepeatedRowsEngine``: every row encodes its whole prompt, the original path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from illume.generation.sampling import RowSpec

# An engine's per-prompt state (for example a KV cache); the Generator only passes it back.
PromptState = Any


@dataclass(frozen=True)
class Prompt:
    """One prompt of one request: the image, the text after the image, the adapter (None: base)."""

    image: Image.Image
    text: str
    adapter: str | None = None


@dataclass(frozen=True)
class DecodeJob:
    """The rows to sample from the end of one prompt."""

    state: PromptState
    rows: Sequence[RowSpec]
    # Polled between steps; True: the rows still running may be dropped (a client went away).
    cancelled: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Finished:
    """One row that has ended: its tokens (without EOS), decoded text and record."""

    job: int
    row: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: Literal["eos", "length"]
    logprob_sum: float


@runtime_checkable
class Engine(Protocol):
    """What the Generator calls; see the module docstring for the contract."""

    def prefill(
        self, prompts: Sequence[Prompt], reuse: Sequence[PromptState | None] | None = None
    ) -> list[PromptState]: ...

    def decode(self, jobs: Sequence[DecodeJob]) -> Iterator[Finished]: ...
