"""Hugging Face engines: the model of a ``LoadedModel`` behind the ``Engine`` boundary.

``ForkEngine`` (one prefill per prompt):
- ``prefill`` runs one forward pass per prompt (image and text) with that prompt's adapter, since
  LoRA changes the keys and values, and keeps the prompt's KV cache and last logits. With ``reuse``
  it keeps the earlier prompt's cache up to the longest token prefix the two prompts share (the new
  prompt is tokenized in full, so the tokens are exactly those of a fresh encoding) and feeds only
  the rest; the vision tower does not run again. It encodes afresh when the shared prefix does not
  hold every image token, the adapter differs or the image is another object.
- ``decode`` copies each job's cache to its rows (the fork) and decodes all rows of all jobs in one
  batch: caches of different lengths are left-padded with zeros that the attention mask hides, and
  each row's positions continue its own prompt. A row that finishes is yielded at once and dropped
  from the batch, so finished rows cost no more compute; the rows of a job whose ``cancelled``
  turns True are dropped the same way at the next step, without a ``Finished``. Each row names its
  adapter (peft's ``adapter_names``), so one batch mixes adapters and the base model.
- Positions: each state keeps its text positions' offset from token indices (``position_offset``:
  0 for most families, 1 for PaliGemma, which counts from 1, and for Qwen2-VL and Qwen2.5-VL the
  multimodal rotary delta after the image); a fresh prefill lets the family compute its own
  positions (3-D for Qwen), and a reuse prefill and the decode continue at index + offset.
- A prefix-LM family (``PREFIX_LM_MODEL_TYPES``: PaliGemma, whose whole prompt attends
  bidirectionally) never reuses another prompt's cache: the answer and the rationale prompts are
  each prefilled once (two image encodings for a request without an answer, still one for all its
  rows). Gemma 3's sliding-window layers keep the whole cache in the fork (the family's mask applies
  the window), so those layers save no memory here.
- ``FORK_MODEL_TYPES`` lists the families tested fork == repeated rows, candidate for candidate
  (tests/unit/generation/test_architectures.py, docs/ARCHITECTURES.md): LLaVA, LLaVA-NeXT,
  Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma, Gemma 3. Every other family runs
  ``RepeatedRowsEngine`` until it is added to that matrix.

``RepeatedRowsEngine`` is the original path: ``prefill`` only remembers the prompt, and ``decode``
makes one ``generate`` call in which every row encodes its image and whole prompt again. It works
for every family and is the reference the fork is tested against. ``generate`` keeps every row in
its batch until the longest one ends (a finished row keeps costing a forward pass per step, fed
padding), yields the rows only at the end, and ignores ``cancelled`` (the caller discards them).

Both sample with ``RowSampler``, so on CPU in fp32 a row's tokens are the same under either engine
(up to arg-max ties broken differently by last-bit differences between the two computations).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from illume.generation.engine import DecodeJob, Finished, Prompt
from illume.generation.prompts import shared_prefix_length
from illume.generation.sampling import RowSampler
from illume.models.loading import LoadedModel

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
FORK_MODEL_TYPES = frozenset(
    {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3"}
)
# Families whose text positions are offset from token indices by a per-prompt constant after the
# image (multimodal rotary positions: the image's tokens take fewer positions than tokens).
MROPE_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
# Families whose positions start at 1, not 0 (PaliGemma's own forward and ``generate`` add one).
ONE_INDEXED_MODEL_TYPES = frozenset({"paligemma"})
# Families whose whole prompt attends bidirectionally (a prefix-LM): a longer prompt changes the
# keys and values of every earlier token, so no prompt's cache is a prefix of another's.
PREFIX_LM_MODEL_TYPES = frozenset({"paligemma"})
# Processor outputs that are not model inputs at inference (PaliGemma's training labels).
_NOT_INPUTS = frozenset({"labels"})


def fork_supported(loaded: LoadedModel) -> bool:
    """Whether ``ForkEngine`` can serve this model's family."""
    return loaded.model_type in FORK_MODEL_TYPES


def encode(
    loaded: LoadedModel, texts: Sequence[str], images: Sequence[Image.Image]
) -> dict[str, torch.Tensor]:
    """The processor's tensors for image+text rows (left-padded), on the model's device and dtype."""
    rows = [loaded.image_placeholder + text for text in texts]
    batch_images: list[Any] = [[img] for img in images] if loaded.nested_images else list(images)
    encoded = loaded.processor(text=rows, images=batch_images, return_tensors="pt", padding=True)
    return {
        k: v.to(loaded.device, dtype=loaded.dtype) if v.is_floating_point() else v.to(loaded.device)
        for k, v in encoded.items()
        if k not in _NOT_INPUTS
    }


def adapter_kwargs(model: Any, adapters: Sequence[str | None]) -> dict[str, Any]:
    """peft's per-row ``adapter_names`` when the model carries adapters, else nothing."""
    if not getattr(model, "peft_config", None):
        return {}
    return {"adapter_names": [a or BASE_ADAPTER for a in adapters]}


@dataclass(frozen=True, eq=False)
class ForkState:
    """One prefilled prompt: its tokens, per-layer keys and values (batch 1) and last logits."""

    token_ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    logits: torch.Tensor
    adapter: str | None
    image: Image.Image
    position_offset: int = 0  # a token's position minus its index after the image (see _position_offset)

    def __len__(self) -> int:
        return len(self.token_ids)


class ForkEngine:
    """One prefill per prompt, forked to its rows; see the module docstring."""

    def __init__(self, loaded: LoadedModel) -> None:
        # The model is read from ``loaded`` on every call: callers wrap it in peft after this.
        self.loaded = loaded

    @torch.inference_mode()
    def prefill(
        self, prompts: Sequence[Prompt], reuse: Sequence[ForkState | None] | None = None
    ) -> list[ForkState]:
        previous = list(reuse) if reuse is not None else [None] * len(prompts)
        return [self._prefill_one(p, r) for p, r in zip(prompts, previous, strict=True)]

    def _prefill_one(self, prompt: Prompt, previous: ForkState | None) -> ForkState:
        from transformers import DynamicCache

        encoded = encode(self.loaded, [prompt.text], [prompt.image])
        ids = encoded["input_ids"]
        shared = self._reusable(previous, prompt, ids[0].tolist())
        if previous is not None and shared:
            cache = DynamicCache(
                ddp_cache_data=[(k[:, :, :shared], v[:, :, :shared]) for k, v in previous.layers]
            )
            offset = previous.position_offset
            positions = torch.arange(shared, ids.shape[1], device=ids.device).unsqueeze(0) + offset
            inputs = {
                "input_ids": ids[:, shared:],
                "attention_mask": encoded["attention_mask"],
                "position_ids": positions,
            }
        else:
            cache, inputs = DynamicCache(), encoded
            offset = self._position_offset(encoded)
        out = self._forward(inputs, cache, [prompt.adapter])
        return ForkState(
            token_ids=tuple(ids[0].tolist()),
            layers=tuple((layer.keys, layer.values) for layer in cache.layers),
            logits=out.logits[0, -1].float(),
            adapter=prompt.adapter,
            image=prompt.image,
            position_offset=offset,
        )

    def _position_offset(self, encoded: dict[str, torch.Tensor]) -> int:
        """The prompt's text position minus token index after its image (usually 0).

        PaliGemma counts positions from 1. Qwen2-VL and Qwen2.5-VL give the image's tokens 3-D
        positions that advance by the image's grid, not by its token count; every text token after
        the image then sits at its index plus this constant in all three rotary sections, which is
        what the family's own ``generate`` uses for the tokens it decodes (its ``rope_deltas``).
        """
        if self.loaded.model_type in ONE_INDEXED_MODEL_TYPES:
            return 1
        if self.loaded.model_type not in MROPE_MODEL_TYPES:
            return 0
        model = self.loaded.model
        owner = next(m for m in model.modules() if hasattr(m, "get_rope_index"))
        _, deltas = owner.get_rope_index(
            encoded["input_ids"],
            mm_token_type_ids=encoded["mm_token_type_ids"],
            image_grid_thw=encoded.get("image_grid_thw"),
            attention_mask=encoded["attention_mask"],
        )
        return int(deltas.reshape(-1)[0])

    def _reusable(self, previous: ForkState | None, prompt: Prompt, ids: list[int]) -> int:
        """How many leading tokens of ``previous``'s cache this prompt may keep (0: encode afresh)."""
        if previous is None or previous.adapter != prompt.adapter or previous.image is not prompt.image:
            return 0
        if self.loaded.model_type in PREFIX_LM_MODEL_TYPES:
            return 0
        image_token = getattr(self.loaded.model.config, "image_token_id", None)
        if image_token is None:
            return 0
        # Keep at least one token to feed: its logits are the ones the first sample needs.
        shared = min(shared_prefix_length(previous.token_ids, ids), len(ids) - 1)
        return 0 if image_token in ids[shared:] else shared

    def _forward(self, inputs: dict[str, torch.Tensor], cache: Any, adapters: Sequence[str | None]) -> Any:
        model = self.loaded.model
        return model(
            **inputs, cache=cache, use_cache=True, logits_to_keep=1, **adapter_kwargs(model, adapters)
        )

    @torch.inference_mode()
    def decode(self, jobs: Sequence[DecodeJob]) -> Iterator[Finished]:
        owners = [(j, r) for j, job in enumerate(jobs) for r in range(len(job.rows))]
        if not owners:
            return
        tokenizer = self.loaded.tokenizer
        states: list[ForkState] = [job.state for job in jobs]
        sampler = RowSampler(
            [jobs[j].rows[r] for j, r in owners],
            tokenizer.eos_token_id,
            self.loaded.vocab_size,
            tokenizer.all_special_ids,
        )
        batch = _Batch.fork(states, [len(job.rows) for job in jobs], self.loaded.device)
        scores = torch.stack([states[j].logits for j, _ in owners])
        tokens: list[list[int]] = [[] for _ in owners]
        step = 0
        while True:
            chosen = sampler.choose(scores, batch.rows, step)
            stopped = {j for j, job in enumerate(jobs) if job.cancelled is not None and job.cancelled()}
            running = []
            for position, i in enumerate(batch.rows):
                if owners[i][0] in stopped:
                    continue  # a cancelled job's row: dropped from the batch, never yielded
                if sampler.finished[i]:
                    yield self._finished(owners[i], tokens[i], sampler, i)
                else:
                    tokens[i].append(int(chosen[position]))
                    running.append(position)
            if not running:
                return
            batch.keep(running)
            adapters = [states[owners[i][0]].adapter for i in batch.rows]
            out = self._forward(batch.step_inputs(chosen[running]), batch.cache, adapters)
            scores = out.logits[:, -1]
            step += 1

    def _finished(self, owner: tuple[int, int], tokens: list[int], sampler: RowSampler, i: int) -> Finished:
        text = self.loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Finished(
            job=owner[0],
            row=owner[1],
            token_ids=tuple(tokens),
            text=text,
            finish_reason="length" if sampler.truncated[i] else "eos",
            logprob_sum=sampler.logprob_sums[i],
        )


def _filled_layer(keys: torch.Tensor, values: torch.Tensor) -> Any:
    """A ``DynamicLayer`` holding ``keys`` and ``values`` themselves (no copy)."""
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


class _Batch:
    """The running rows of a fork decode: their shared cache, attention mask and next positions."""

    def __init__(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor, rows: list[int]) -> None:
        self.cache = cache
        self.mask = mask
        self.positions = positions
        self.rows = rows  # sampler row index of each batch position

    @classmethod
    def fork(cls, states: Sequence[ForkState], counts: Sequence[int], device: torch.device) -> _Batch:
        """Each state copied to its ``count`` rows, left-padded to the longest prompt.

        The copies become the cache's layers as they are: ``DynamicCache(ddp_cache_data=...)``
        would concatenate each onto an empty tensor, holding every layer twice until the fork is
        done (measured: the peak RSS of a batch of 8 LLaVA-1.5-shaped requests grew by twice their
        KV cache)."""
        from transformers import DynamicCache

        width = max(len(s) for s, c in zip(states, counts, strict=True) if c)
        cache = DynamicCache()
        cache.layers = []
        for layer in range(len(states[0].layers)):
            keys, values = [], []
            for state, count in zip(states, counts, strict=True):
                k, v = state.layers[layer]
                pad = (0, 0, width - len(state), 0)  # zeros before the prompt, hidden by the mask
                keys.append(torch.nn.functional.pad(k, pad).expand(count, -1, -1, -1))
                values.append(torch.nn.functional.pad(v, pad).expand(count, -1, -1, -1))
            cache.layers.append(_filled_layer(torch.cat(keys), torch.cat(values)))
        lengths = [len(s) for s, c in zip(states, counts, strict=True) for _ in range(c)]
        offsets = [s.position_offset for s, c in zip(states, counts, strict=True) for _ in range(c)]
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
        positions = torch.tensor(lengths, device=device) + torch.tensor(offsets, device=device)
        return cls(cache, mask, positions, list(range(len(lengths))))

    def keep(self, positions: list[int]) -> None:
        """Drop the rows not at ``positions`` (finished ones) from the cache and bookkeeping."""
        if len(positions) == len(self.rows):
            return
        index = torch.tensor(positions, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.rows = [self.rows[p] for p in positions]

    def step_inputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs that feed one new token per running row; advances the positions."""
        ones = torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        inputs = {
            "input_ids": tokens.to(self.mask.device).unsqueeze(1),
            "attention_mask": self.mask,
            "position_ids": self.positions.unsqueeze(1),
        }
        self.positions = self.positions + 1
        return inputs


@dataclass(frozen=True)
class PromptOnly:
    """``RepeatedRowsEngine``'s state: the prompt itself (every row encodes it again)."""

    prompt: Prompt


class RepeatedRowsEngine:
    """Every row encodes its image and whole prompt, in one ``generate`` call; see the module docstring."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def prefill(
        self, prompts: Sequence[Prompt], reuse: Sequence[PromptOnly | None] | None = None
    ) -> list[PromptOnly]:
        return [PromptOnly(p) for p in prompts]

    @torch.inference_mode()
    def decode(self, jobs: Sequence[DecodeJob]) -> Iterator[Finished]:
        from transformers import GenerationConfig, LogitsProcessorList

        owners = [(j, r) for j, job in enumerate(jobs) for r in range(len(job.rows))]
        if not owners:
            return
        prompts: list[Prompt] = [jobs[j].state.prompt for j, _ in owners]
        specs = [jobs[j].rows[r] for j, r in owners]
        tokenizer = self.loaded.tokenizer
        inputs = encode(self.loaded, [p.text for p in prompts], [p.image for p in prompts])
        sampler = RowSampler(specs, tokenizer.eos_token_id, self.loaded.vocab_size, tokenizer.all_special_ids)
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(s.max_new_tokens for s in specs) + 1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        model = self.loaded.model
        output = model.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
            **adapter_kwargs(model, [p.adapter for p in prompts]),
        )
        continuation = output[:, inputs["input_ids"].shape[1] :].tolist()
        for i, (job, row) in enumerate(owners):
            tokens = continuation[i][: sampler.tokens[i]]
            yield Finished(
                job=job,
                row=row,
                token_ids=tuple(tokens),
                text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                finish_reason="length" if sampler.truncated[i] else "eos",
                logprob_sum=sampler.logprob_sums[i],
            )
