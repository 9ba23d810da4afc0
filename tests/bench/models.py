"""Models for the benchmarks: the embedded default, or a random-weight VLM of about 100M parameters.

The large one is where generation, not serving overhead, dominates; it is built once into
``.bench/`` from a config (random weights, nothing downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch

from illume.models.default import _FALLBACK_TEXTS, default_model_dir
from illume.models.tiny import ARCH_SPECIALS, _llava_processor, _text_config, train_word_tokenizer

BENCH_DIR = Path(".bench")


def random_vlm_100m(out: Path = BENCH_DIR / "random-vlm-100m") -> Path:
    """A LLaVA with a small vision tower and a 768 x 10-layer Llama LM (~100M parameters)."""
    if (out / "config.json").is_file():
        return out
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = train_word_tokenizer(_FALLBACK_TEXTS, ARCH_SPECIALS["llava"])
    text = _text_config(tokenizer, 768, 10)
    text.update(intermediate_size=3072, num_attention_heads=12, num_key_value_heads=12)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            projection_dim=256,
        ),
        text_config=LlamaConfig(**text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _llava_processor(tokenizer, 64, 16, 256).save_pretrained(out)
    return out


def bench_model(name: str) -> Path:
    if name == "default":
        return default_model_dir(BENCH_DIR)
    if name == "random-100m":
        return random_vlm_100m()
    return Path(name)


def parameter_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += _numel(handle.get_slice(key).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
