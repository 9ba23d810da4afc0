"""LoRA targets the language model only, for every supported architecture."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model

from illume.models import lora_target_regex
from illume.models.tiny import ARCH_SPECIALS, build_tiny_model, train_word_tokenizer

LANGUAGE_MODEL = {"llava": "language_model", "idefics3": "text_model", "qwen2_vl": "language_model"}
VISION = {"llava": "vision_tower", "idefics3": "vision_model", "qwen2_vl": "visual"}


@pytest.mark.parametrize("arch", ["llava", "idefics3", "qwen2_vl"])
def test_lora_modules_exist_only_in_the_language_model(arch, tiny_texts):
    tokenizer = train_word_tokenizer(tiny_texts, ARCH_SPECIALS[arch])
    model = build_tiny_model(arch, tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=lora_target_regex(model)))
    lora_modules = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(lora_modules) == 2 * 4  # two layers x q, k, v, o
    assert all(f".{LANGUAGE_MODEL[arch]}." in name for name in lora_modules)
    assert not any(VISION[arch] in name for name in lora_modules)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and LANGUAGE_MODEL[arch] in name for name in trainable)
