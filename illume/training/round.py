"""The body of one ILLUME tuning round: LoRA supervised fine-tuning on a snapshot.

Contract:

- ``train_round(snapshot, config, reporter, *, model_dir, image_loader, out_dir, ...)`` loads the
  base checkpoint from ``model_dir`` (local only), adds a fresh LoRA adapter on the language model
  only (``lora_target_regex``) -- or continues the parent adapter when ``config.init_from ==
  "parent"`` and one is given -- freezes every base weight, trains for ``config.epochs`` epochs (or
  ``config.max_steps`` steps) with AdamW at a constant learning rate (or one that decays linearly
  to 0 over the planned steps, ``lr_schedule="linear"``), and saves the adapter to
  ``out_dir`` with ``save_pretrained`` (safetensors) plus ``illume_round.json`` (provenance).
- Epoch ``e`` (from 1) trains on ``snapshot.pass_rows(e - 1)``: every row when the snapshot has one
  replay pass, else the rationale rows and that pass's answer rows, so no replay question is seen
  twice within ``replay_passes`` epochs.
- Rows are encoded one at a time by the model's processor (image + prompt + target), the
  tokenizer's EOS id is appended, and rows are right-padded into batches. Labels are -100 on the
  image, the prompt and the padding: the loss is taken on the target tokens and EOS only.
- Loss. Each row's loss is the mean token cross-entropy over its target tokens. A rationale row
  weighs ``snapshot.rationale_loss_weight`` (w) times its own ``row.weight`` (what its rating gave
  it, 1.0 unrated; snapshot.py, "what people said"), an answer row 1. A batch's objective is
  ``sum_r w_r * loss_r / (batch_rows * mean_w)``, with ``mean_w`` the mean weight over the rows
  of one pass. The normaliser is a constant, so the objective is an unbiased estimate of the
  pass's weighted mean row loss ``sum w_r loss_r / sum w_r``; with the paper's
  ``w = #answer rows / sum of the rationale rows' own weights`` (per pass), rationale rows and
  answer rows each carry half of it, and the learning rate means the same whatever the replay ratio.
- ``reporter(epoch, metrics)`` is called after every epoch (``epoch`` counts from 1) with
  ``loss`` (the weighted mean row loss ``sum w_r loss_r / sum w_r`` over the epoch's rows, the
  quantity the objective estimates, measured as the epoch went), ``objective`` (mean batch
  objective), ``rationale_loss`` / ``answer_loss`` (mean row loss of each kind, NaN if the epoch had
  none), ``rows``, ``steps``, ``seconds`` and ``learning_rate`` (the rate after the epoch's last step).
- Deterministic on CPU: the seed fixes the LoRA initialisation, the shuffling and the dropout, so
  the same snapshot, config and seed (and world size) give identical adapter tensors. Epoch ``e``'s
  data order depends on the seed and ``e`` only: each replay pass's loader draws its orders in turn
  from its own generator seeded with the seed; a distributed sampler shuffles with seed + ``e``.
- ``checkpoint(epoch, metrics, state_dir)``, when given, is called by every process after
  ``reporter`` at the end of every epoch (the last included). On the main process ``state_dir``
  is a fresh temporary directory already holding the complete training state, on other ranks
  None; it is deleted when the callback returns (or raises), so the callback copies or uploads it
  synchronously (as ``ray.train.report`` does). The state (``TrainingState``, format
  ``TRAINING_STATE_FORMAT``): the trainable LoRA tensors of the unwrapped model (safetensors), the
  optimizer and LR scheduler state dicts, the epoch just finished, the step count, the epochs'
  metrics so far, the RNG states of every rank (torch, CUDA when available, ``random``, numpy,
  and each loader's shuffling generator), the snapshot's sha256, the TrainConfig, the world size
  and the base checkpoint's fingerprint.
- ``resume_from`` is such a directory, given to every rank: the round restores it and continues
  at the next epoch; ``reporter`` and ``checkpoint`` see the new epochs only, and the adapter,
  the step count and the epochs' metrics (restored ones included; ``seconds`` aside) equal an
  uninterrupted round's. A state
  that already reached ``config.epochs`` or ``max_steps`` trains nothing and saves its adapter. A
  state of another snapshot, TrainConfig, world size, base or format raises ValueError with a
  one-line reason (all but the base before the model loads).
- ``prepare_model`` / ``prepare_loader`` are identity by default; a Ray Train worker passes
  ``ray.train.torch.prepare_model`` / ``prepare_data_loader`` (DDP and a distributed sampler).
  Under ``torch.distributed`` only rank 0 writes ``out_dir`` and the training state (gathering
  every rank's RNG states: ``checkpoint`` runs in step on all ranks). Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from illume.generation.prompts import shared_prefix_length
from illume.images import load_image_file
from illume.models.loading import (
    DEFAULT_LORA_PROJECTIONS,
    LoadedModel,
    ModelSettings,
    load_model,
    lora_target_regex,
)
from illume.training.snapshot import Snapshot, SnapshotRow

IGNORE_INDEX = -100
ROUND_METADATA = "illume_round.json"
Reporter = Callable[[int, dict[str, float]], None]
# checkpoint(epoch, metrics, state_dir): state_dir is the training state (main process) or None.
Checkpointer = Callable[[int, dict[str, float], Path | None], None]
ImageLoader = Callable[[str], Image.Image]


class TrainConfig(BaseModel):
    """Settings of one tuning round (defaults follow the paper where it has one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: float = Field(
        1e-4,
        gt=0,
        description="Learning rate (the peak of a linear schedule). 1e-4 suits LoRA on real checkpoints; "
        "tiny random models learn visibly only at about 1e-2 or more. (The paper: 1.12e-3 for "
        "bottleneck adapters.)",
    )
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description="'constant' (the paper's) or 'linear': decay from learning_rate to 0 over the round's "
        "steps, so the adapter ends at a point of low gradient noise.",
    )
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas (the paper's).")
    weight_decay: float = Field(0.2, ge=0, description="AdamW decoupled weight decay (the paper's).")
    epochs: int = Field(5, ge=1, description="Passes over the snapshot (the paper: 5 per round).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps, even mid-epoch (None: no limit)."
    )
    batch_size: int = Field(8, ge=1, description="Rows per optimiser step (per worker under Ray Train).")
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradient norm to this value (None: no clipping, as the paper)."
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_projections: tuple[str, ...] = Field(
        DEFAULT_LORA_PROJECTIONS, description="Projection names of the language model that get LoRA."
    )
    init_from: Literal["base", "parent"] = Field(
        "base",
        description="'base': a fresh adapter every round (the default); 'parent': continue training "
        "the parent adapter when one is given (a first round without a parent starts from base).",
    )
    seed: int = Field(0, description="Seed of the LoRA initialisation, the shuffling and the dropout.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Base model dtype ('auto': bfloat16 on CUDA, float32 on CPU)."
    )
    image_backend: Literal["pil", "torchvision"] = Field("pil", description="Image processor backend.")


@dataclass(frozen=True)
class RoundResult:
    """What a round produced."""

    adapter_dir: Path
    snapshot_sha256: str
    epochs: list[dict[str, float]]
    steps: int
    rows: int
    rationale_rows: int
    answer_rows: int
    rationale_loss_weight: float
    initialised_from: str  # "base" or the parent adapter directory
    base_fingerprint: str
    adapter_sha256: str
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.epochs[-1]["loss"] if self.epochs else math.nan


# --- encoding --------------------------------------------------------------------------------


# Prefix-LM families: token type 1 marks the causal suffix (the target), 0 the prompt.
CAUSAL_TARGET_TOKEN_TYPES = frozenset({"paligemma"})


def encode_row(loaded: LoadedModel, row: SnapshotRow, image: Image.Image) -> dict[str, torch.Tensor]:
    """One row as model inputs (batch dimension 1) with ``labels`` on the target tokens and EOS.

    The processor expands the image placeholder, so the prompt's length is measured by encoding
    the prompt alone with the same image; the loss starts where the two encodings first differ (a
    tokenizer that merges across the prompt/target boundary loses at most that merged token).
    """
    processor = loaded.processor
    images: list[Any] = [[image]] if loaded.nested_images else [image]
    prompt_text = loaded.image_placeholder + row.prompt
    prompt = processor(text=[prompt_text], images=images, return_tensors="pt")
    full = processor(text=[prompt_text + row.target], images=images, return_tensors="pt")
    ids = full["input_ids"][0]
    start = shared_prefix_length(prompt["input_ids"][0].tolist(), ids.tolist())
    eos = loaded.tokenizer.eos_token_id
    length = ids.shape[0]
    append = int(ids[-1]) != eos
    if start >= length and not append:
        raise ValueError(f"target {row.target!r} of {row.source_id} encodes to no tokens")
    out: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and value.shape == (1, length):  # per-token (ids, masks, token types)
            if append:
                extra = eos if key == "input_ids" else (1 if key == "attention_mask" else 0)
                value = torch.cat([value, torch.full((1, 1), extra, dtype=value.dtype)], dim=1)
            out[key] = value
        else:
            out[key] = value
    if loaded.model_type in CAUSAL_TARGET_TOKEN_TYPES and "token_type_ids" in out:
        # PaliGemma's prompt attends both ways (token type 0); a target marked 0 would see the
        # tokens after it, so the loss would be taken on tokens the model can read ahead of.
        out["token_type_ids"] = out["token_type_ids"].clone()
        out["token_type_ids"][:, start:] = 1
    labels = out["input_ids"].clone()
    labels[:, :start] = IGNORE_INDEX
    out["labels"] = labels
    return out


def _token_keys(example: dict[str, torch.Tensor]) -> set[str]:
    length = example["input_ids"].shape[1]
    return {k for k, v in example.items() if v.dim() == 2 and v.shape[1] == length}


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad per-token tensors; concatenate image tensors along the batch dimension."""
    token_keys = _token_keys(examples[0])
    longest = max(e["input_ids"].shape[1] for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key in token_keys:
            pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.cat(
                [
                    torch.cat([v, torch.full((1, longest - v.shape[1]), pad, dtype=v.dtype)], dim=1)
                    for v in values
                ]
            )
        else:
            batch[key] = _concat_images(values)
    return batch


def _concat_images(values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 when rows differ there (images per row)."""
    if values[0].dim() >= 2 and len({v.shape[1] for v in values}) > 1:
        most = max(v.shape[1] for v in values)
        values = [
            torch.cat([v, v.new_zeros((v.shape[0], most - v.shape[1], *v.shape[2:]))], dim=1) for v in values
        ]
    return torch.cat(values)


class SnapshotDataset(torch.utils.data.Dataset):
    """Encodes snapshot rows on access (images through ``image_loader``)."""

    def __init__(
        self, loaded: LoadedModel, rows: Sequence[SnapshotRow], image_loader: ImageLoader, weight: float
    ) -> None:
        self.loaded = loaded
        self.rows = list(rows)
        self.image_loader = image_loader
        self.weight = weight

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        example = encode_row(self.loaded, row, self.image_loader(row.image))
        rationale = row.kind == "rationale"
        example["row_weight"] = torch.tensor([self.weight * row.weight if rationale else 1.0])
        example["is_rationale"] = torch.tensor([rationale])
        return example


def pad_token_id(loaded: LoadedModel) -> int:
    """The id rows are right-padded with: the tokenizer's pad token, else its EOS."""
    pad = loaded.tokenizer.pad_token_id
    return int(loaded.tokenizer.eos_token_id if pad is None else pad)


def make_loader(
    dataset: SnapshotDataset, batch_size: int, *, shuffle: bool, seed: int
) -> torch.utils.data.DataLoader:
    pad = pad_token_id(dataset.loaded)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=_Collator(pad),
    )


@dataclass(frozen=True)
class _Collator:
    """Picklable collate function (DataLoader workers and Ray's loader rebuild need one)."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_token_id)


# --- loss ------------------------------------------------------------------------------------


def row_losses(
    model: Any, batch: dict[str, torch.Tensor], dtype: torch.dtype, **model_kwargs: Any
) -> torch.Tensor:
    """Mean target-token cross-entropy of every row of ``batch`` (shape: rows); ``model_kwargs``
    go to the forward pass (peft's per-row ``adapter_names`` when scoring adapters side by side)."""
    device = batch["input_ids"].device
    inputs = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in batch.items()
        if k not in ("labels", "row_weight", "is_rationale")
    }
    logits = model(**inputs, use_cache=False, **model_kwargs).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    # Only the target positions are lifted to float32 (logits of real vocabularies are large).
    picked = logits[:, :-1][mask].float()
    token_loss = torch.nn.functional.cross_entropy(picked, labels[mask], reduction="none")
    rows = torch.arange(labels.shape[0], device=device).unsqueeze(1).expand_as(labels)[mask]
    sums = torch.zeros(labels.shape[0], device=device).index_add(0, rows, token_loss)
    counts = mask.sum(dim=1).clamp(min=1)
    return sums / counts


def mean_row_weight(snapshot: Snapshot) -> float:
    """Mean loss weight over the rows of one pass (the objective's constant normaliser)."""
    if not snapshot.rows:
        return 1.0
    w = snapshot.rationale_loss_weight
    answers = snapshot.answer_rows / snapshot.passes
    rationale_weight = sum(r.weight for r in snapshot.rows if r.kind == "rationale")
    return (rationale_weight * w + answers) / (snapshot.rationale_rows + answers)


def epoch_loader(loaders: Sequence[Any], epoch: int) -> Any:
    """The loader of epoch ``epoch`` (from 1): the replay passes take turns."""
    return loaders[(epoch - 1) % len(loaders)]


def planned_steps(loaders: Sequence[Any], config: TrainConfig) -> int:
    """Optimiser steps the round will take: every epoch's batches, capped by ``max_steps``."""
    total = sum(len(epoch_loader(loaders, epoch)) for epoch in range(1, config.epochs + 1))
    return min(total, config.max_steps) if config.max_steps is not None else total


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The rate's factor per step: 1 throughout ('constant'), or 1 - step / total ('linear')."""
    if config.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# --- the model -------------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft asks transformers a deprecated question (is_gradient_checkpointing); not ours to fix.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter_model(
    model: Any, adapter_dir: str | Path, *, adapter_name: str = "default", is_trainable: bool = False
) -> Any:
    """Wrap a base model in a ``PeftModel`` with the adapter saved in ``adapter_dir``."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(
            model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable
        )


def _lora_model(loaded: LoadedModel, config: TrainConfig, parent: Path | None) -> Any:
    from peft import get_peft_model

    if parent is not None:
        return load_adapter_model(loaded.model, parent, is_trainable=True)
    with _quiet_peft():
        return get_peft_model(loaded.model, _lora_config(loaded, config))


def _lora_config(loaded: LoadedModel, config: TrainConfig) -> Any:
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_regex(loaded.model, tuple(config.lora_projections)),
        bias="none",
    )
    return lora


def adapter_sha256(adapter_dir: str | Path) -> str:
    """sha256 over the adapter's config and weight files (names and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(Path(adapter_dir).iterdir()):
        if path.name.startswith("adapter_") and path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# --- training state: checkpoint after an epoch, resume at the next --------------------------

TRAINING_STATE_FORMAT = 1
_STATE_FILE = "training_state.json"
_TRAINABLE_FILE = "trainable.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"
_RNG_FILE = "rng.pt"


@dataclass(frozen=True)
class TrainingState:
    """A round's progress after an epoch: ``training_state.json`` of a state directory.

    Beside it: ``trainable.safetensors`` (the trainable LoRA parameters by name),
    ``optimizer.pt`` (optimizer and LR scheduler state dicts) and ``rng.pt`` (the RNG states of
    every rank). ``training_state.json`` is written last.
    """

    epoch: int
    steps: int
    epochs: list[dict[str, float]]
    snapshot_sha256: str
    config: dict[str, Any]
    world_size: int
    base_fingerprint: str
    format: int = TRAINING_STATE_FORMAT


def load_training_state(
    directory: str | Path, *, snapshot: Snapshot, config: TrainConfig, world_size: int
) -> TrainingState:
    """The state in ``directory``; ValueError (one line) when this round cannot continue from it."""
    path = Path(directory) / _STATE_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds no training state ({_STATE_FILE} is missing)")
    data = json.loads(path.read_text())
    if data.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"training state format {data.get('format')!r} is not {TRAINING_STATE_FORMAT}")
    state = TrainingState(**data)
    if state.snapshot_sha256 != snapshot.sha256:
        raise ValueError(
            f"the training state is of snapshot {state.snapshot_sha256}, not of {snapshot.sha256}"
        )
    current = config.model_dump(mode="json")
    differing = sorted(
        k for k in current.keys() | state.config.keys() if current.get(k) != state.config.get(k)
    )
    if differing:
        raise ValueError(
            f"the training state was written with another TrainConfig ({', '.join(differing)} differ)"
        )
    if state.world_size != world_size:
        # The distributed sampler's split and every rank's RNG stream depend on the world size.
        raise ValueError(f"the training state was written by {state.world_size} workers, not {world_size}")
    return state


def _world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _trainable_parameters(peft_model: Any) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}


def _restore_trainable(peft_model: Any, directory: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(directory / _TRAINABLE_FILE)
    params = _trainable_parameters(peft_model)
    if saved.keys() != params.keys():
        raise ValueError("the training state's adapter has other parameters than this round's model")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def _loader_generators(loaders: Sequence[Any]) -> list[torch.Generator | None]:
    """The generator each loader shuffles with (None for one that does not have its own)."""
    generators = [getattr(loader, "generator", None) for loader in loaders]
    return [g if isinstance(g, torch.Generator) else None for g in generators]


def _rng_state(loaders: Sequence[Any]) -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        # Each replay pass's loader draws its next epoch's order from its own generator.
        "loaders": [g.get_state() if g is not None else None for g in _loader_generators(loaders)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        # As a tensor: torch.load(weights_only=True) refuses numpy arrays.
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
    }


def _set_rng_state(state: dict[str, Any], loaders: Sequence[Any]) -> None:
    for generator, saved in zip(_loader_generators(loaders), state["loaders"], strict=True):
        if generator is not None and saved is not None:
            generator.set_state(saved)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))


def _every_rank_rng_state(loaders: Sequence[Any]) -> list[dict[str, Any]]:
    """The RNG states of all ranks, by rank (a collective under torch.distributed)."""
    _, world_size = _world()
    if world_size == 1:
        return [_rng_state(loaders)]
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, _rng_state(loaders))
    return states


def _write_training_state(
    directory: Path, state: TrainingState, peft_model: Any, optimizer: Any, scheduler: Any, rng: list[Any]
) -> None:
    from safetensors.torch import save_file

    trainable = {name: p.detach().cpu().contiguous() for name, p in _trainable_parameters(peft_model).items()}
    save_file(trainable, directory / _TRAINABLE_FILE)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        directory / _OPTIMIZER_FILE,
    )
    torch.save(rng, directory / _RNG_FILE)
    (directory / _STATE_FILE).write_text(json.dumps(asdict(state), indent=1, sort_keys=True))


def _hand_over_training_state(
    checkpoint: Checkpointer,
    metrics: dict[str, float],
    state: TrainingState,
    peft_model: Any,
    optimizer: Any,
    scheduler: Any,
    loaders: Sequence[Any],
) -> None:
    """Write the state to a fresh directory (main process), call ``checkpoint``, then delete it."""
    rng = _every_rank_rng_state(loaders)
    if not _is_main_process():
        checkpoint(state.epoch, dict(metrics), None)
        return
    directory = Path(tempfile.mkdtemp(prefix="illume-training-state-"))
    try:
        _write_training_state(directory, state, peft_model, optimizer, scheduler, rng)
        checkpoint(state.epoch, dict(metrics), directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _restore_optimizer(optimizer: Any, scheduler: Any, directory: Path) -> None:
    saved = torch.load(directory / _OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])


def _restore_rng(directory: Path, rank: int, loaders: Sequence[Any]) -> None:
    _set_rng_state(torch.load(directory / _RNG_FILE, weights_only=True)[rank], loaders)


def _start_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Tell a distributed sampler the epoch (and the round's seed: its own is 0) so it reshuffles."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        if hasattr(sampler, "seed"):
            sampler.seed = seed
        sampler.set_epoch(epoch)


def _reached_max_steps(steps: int, config: TrainConfig) -> bool:
    return config.max_steps is not None and steps >= config.max_steps


def _train_epoch(
    model: Any,
    loader: Any,
    optimizer: Any,
    scheduler: Any,
    trainable: list[torch.nn.Parameter],
    config: TrainConfig,
    *,
    normaliser: float,
    loaded: LoadedModel,
    steps: int,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` (cut short at ``max_steps``): its metrics and the step count after it."""
    started = time.perf_counter()
    totals = dict.fromkeys(
        ("objective", "weighted", "weights", "batches", "rationale", "n_rationale", "answer", "n_answer"), 0.0
    )
    for batch in loader:
        batch = _to_device(batch, loaded.device)
        losses = row_losses(model, batch, loaded.dtype)
        weights = batch["row_weight"].view(-1).to(losses.dtype)
        objective = (weights * losses).sum() / (losses.shape[0] * normaliser)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        steps += 1
        is_rationale = batch["is_rationale"].view(-1)
        detached = losses.detach()
        totals["objective"] += float(objective.detach())
        totals["weighted"] += float((weights * detached).sum())
        totals["weights"] += float(weights.sum())
        totals["batches"] += 1
        totals["rationale"] += float(detached[is_rationale].sum())
        totals["n_rationale"] += int(is_rationale.sum())
        totals["answer"] += float(detached[~is_rationale].sum())
        totals["n_answer"] += int((~is_rationale).sum())
        if _reached_max_steps(steps, config):
            break
    metrics = {
        "loss": _mean(totals["weighted"], totals["weights"]),
        "objective": _mean(totals["objective"], totals["batches"]),
        "rationale_loss": _mean(totals["rationale"], totals["n_rationale"]),
        "answer_loss": _mean(totals["answer"], totals["n_answer"]),
        "rows": float(totals["n_rationale"] + totals["n_answer"]),
        "steps": float(steps),
        "seconds": time.perf_counter() - started,
        "learning_rate": optimizer.param_groups[0]["lr"],
    }
    return metrics, steps


# --- the round -------------------------------------------------------------------------------


def train_round(
    snapshot: Snapshot,
    config: TrainConfig,
    reporter: Reporter | None = None,
    *,
    model_dir: str | Path,
    image_loader: ImageLoader = load_image_file,
    out_dir: str | Path,
    parent_adapter: str | Path | None = None,
    prepare_model: Callable[[Any], Any] | None = None,
    prepare_loader: Callable[[Any], Any] | None = None,
    checkpoint: Checkpointer | None = None,
    resume_from: str | Path | None = None,
) -> RoundResult:
    """Train a LoRA adapter on ``snapshot`` and save it to ``out_dir`` (see the module docstring)."""
    if not snapshot.rows:
        raise ValueError("the snapshot has no rows to train on")
    started = time.perf_counter()
    rank, world_size = _world()
    resume_dir = Path(resume_from) if resume_from is not None else None
    resumed = (
        load_training_state(resume_dir, snapshot=snapshot, config=config, world_size=world_size)
        if resume_dir is not None
        else None
    )
    loaded = load_model(
        ModelSettings(
            path=Path(model_dir), device=config.device, dtype=config.dtype, image_backend=config.image_backend
        )
    )
    if resumed is not None and resumed.base_fingerprint != loaded.fingerprint():
        raise ValueError(
            f"the training state was trained on base {resumed.base_fingerprint}, not on {model_dir}"
        )
    parent = Path(parent_adapter) if parent_adapter is not None and config.init_from == "parent" else None
    torch.manual_seed(config.seed)
    model = _lora_model(loaded, config, parent)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if resume_dir is not None:
        _restore_trainable(model, resume_dir)  # before prepare_model: DDP starts from these weights
    model = (prepare_model or (lambda m: m))(model)
    loaders = [
        (prepare_loader or (lambda d: d))(
            make_loader(
                SnapshotDataset(loaded, snapshot.pass_rows(p), image_loader, snapshot.rationale_loss_weight),
                config.batch_size,
                shuffle=True,
                seed=config.seed,
            )
        )
        for p in range(min(snapshot.passes, config.epochs))
    ]
    # The optimizer covers the same parameters in the same order as the one whose state is restored.
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay
    )
    scheduler = learning_rate_schedule(optimizer, config, planned_steps(loaders, config))
    epochs: list[dict[str, float]] = []
    steps = 0
    if resume_dir is not None and resumed is not None:
        _restore_optimizer(optimizer, scheduler, resume_dir)
        epochs, steps = list(resumed.epochs), resumed.steps
        # Last: nothing between here and the first batch draws random numbers.
        _restore_rng(resume_dir, rank, loaders)
    normaliser = mean_row_weight(snapshot)
    first_epoch = resumed.epoch + 1 if resumed is not None else 1
    for epoch in range(first_epoch, config.epochs + 1):
        if _reached_max_steps(steps, config):
            break
        loader = epoch_loader(loaders, epoch)
        _start_epoch(loader, config.seed, epoch)
        metrics, steps = _train_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            trainable,
            config,
            normaliser=normaliser,
            loaded=loaded,
            steps=steps,
        )
        metrics = {"epoch": float(epoch), **metrics}
        epochs.append(metrics)
        if reporter is not None:
            reporter(epoch, dict(metrics))
        if checkpoint is not None:
            state = TrainingState(
                epoch=epoch,
                steps=steps,
                epochs=list(epochs),
                snapshot_sha256=snapshot.sha256,
                config=config.model_dump(mode="json"),
                world_size=world_size,
                base_fingerprint=loaded.fingerprint(),
            )
            _hand_over_training_state(
                checkpoint, metrics, state, _unwrap(model), optimizer, scheduler, loaders
            )
    out = Path(out_dir)
    peft_model = _unwrap(model)
    initialised_from = str(parent) if parent is not None else "base"
    digest = ""
    if _is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out, safe_serialization=True)
        digest = adapter_sha256(out)
    result = RoundResult(
        adapter_dir=out,
        snapshot_sha256=snapshot.sha256,
        epochs=epochs,
        steps=steps,
        rows=len(snapshot.rows),
        rationale_rows=snapshot.rationale_rows,
        answer_rows=snapshot.answer_rows,
        rationale_loss_weight=snapshot.rationale_loss_weight,
        initialised_from=initialised_from,
        base_fingerprint=loaded.fingerprint(),
        adapter_sha256=digest,
        seconds=time.perf_counter() - started,
        config=config.model_dump(mode="json"),
    )
    if _is_main_process():
        (out / ROUND_METADATA).write_text(json.dumps(round_metadata(result), indent=1, sort_keys=True))
    return result


def round_metadata(result: RoundResult) -> dict[str, Any]:
    """The provenance written beside the adapter (``illume_round.json``)."""
    return {
        "snapshot_sha256": result.snapshot_sha256,
        "base_fingerprint": result.base_fingerprint,
        "adapter_sha256": result.adapter_sha256,
        "initialised_from": result.initialised_from,
        "rows": result.rows,
        "rationale_rows": result.rationale_rows,
        "answer_rows": result.answer_rows,
        "rationale_loss_weight": result.rationale_loss_weight,
        "steps": result.steps,
        "epochs": result.epochs,
        "seconds": result.seconds,
        "config": result.config,
    }


@torch.no_grad()
def snapshot_loss(
    snapshot: Snapshot,
    *,
    model_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    adapter_dir: str | Path | None = None,
    image_loader: ImageLoader = load_image_file,
    batch_size: int = 8,
) -> dict[str, float]:
    """The weighted objective and the per-kind mean row losses of a model on ``snapshot`` (eval mode).

    Pass ``model_dir`` (loaded here, optionally with ``adapter_dir``) or an already ``loaded`` model.
    """
    if loaded is None:
        if model_dir is None:
            raise ValueError("give model_dir or loaded")
        loaded = load_model(ModelSettings(path=Path(model_dir)))
        if adapter_dir is not None:
            loaded.model = load_adapter_model(loaded.model, adapter_dir)
    model = loaded.model
    was_training = model.training
    model.eval()
    dataset = SnapshotDataset(loaded, snapshot.rows, image_loader, snapshot.rationale_loss_weight)
    weighted = weights = 0.0
    sums = {"rationale": 0.0, "answer": 0.0}
    counts = {"rationale": 0, "answer": 0}
    try:
        for batch in make_loader(dataset, batch_size, shuffle=False, seed=0):
            batch = _to_device(batch, loaded.device)
            losses = row_losses(model, batch, loaded.dtype)
            w = batch["row_weight"].view(-1).to(losses.dtype)
            weighted += float((w * losses).sum())
            weights += float(w.sum())
            rationale = batch["is_rationale"].view(-1)
            for kind, mask in (("rationale", rationale), ("answer", ~rationale)):
                sums[kind] += float(losses[mask].sum())
                counts[kind] += int(mask.sum())
    finally:
        model.train(was_training)
    return {
        "loss": weighted / weights if weights else math.nan,
        "rationale_loss": _mean(sums["rationale"], counts["rationale"]),
        "answer_loss": _mean(sums["answer"], counts["answer"]),
    }


__all__ = [
    "RoundResult",
    "TrainConfig",
    "adapter_sha256",
    "collate",
    "encode_row",
    "load_adapter_model",
    "mean_row_weight",
    "pad_token_id",
    "round_metadata",
    "row_losses",
    "snapshot_loss",
    "train_round",
]
