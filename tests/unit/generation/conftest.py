"""Fixtures of the engine tests: tiny models, one with two random LoRA adapters, and counting hooks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from illume.models import ModelSettings, load_model, lora_target_regex
from illume.models.loading import LoadedModel

ADAPTERS = ("rationale-v1", "rationale-v2")


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def loaded(request, tiny_dir) -> LoadedModel:
    return load_model(ModelSettings(path=tiny_dir(request.param)))


@pytest.fixture(scope="module")
def lora_loaded(tiny_dir) -> LoadedModel:
    """The tiny LLaVA carrying two random (non-zero) LoRA adapters beside the base model."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(ModelSettings(path=tiny_dir("llava")))
    targets = lora_target_regex(loaded.model)  # from the plain model's module names
    for seed, name in enumerate(ADAPTERS, start=1):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        if seed == 1:
            loaded.model = get_peft_model(loaded.model, config, adapter_name=name)
        else:
            loaded.model.add_adapter(name, config)
    loaded.model.eval()
    return loaded


def vision_module(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder of a LLaVA (``vision_tower``) or Idefics3 (``vision_model``) model."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("vision_tower", "vision_model"):
            return module
    raise LookupError("no vision encoder")


@contextmanager
def count_images(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the images the vision encoder encodes (its input's batch size, summed over calls)."""
    counted = [0]

    def hook(_module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        counted[0] += pixels.shape[0]

    handle = vision_module(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counted
    finally:
        handle.remove()


@contextmanager
def count_fed_tokens(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the token positions the language model embeds (what a prefill or step feeds)."""
    counted = [0]

    def hook(_module, args):
        counted[0] += args[0].numel()

    handle = model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        yield counted
    finally:
        handle.remove()
