"""Builders of small vision-language checkpoints from configs (random weights, no download).

Used by the tests (tiny LLaVA, Idefics3 and Qwen2-VL models) and as the skeleton of the project's
default model. Each builder writes a standard Hugging Face checkpoint directory (config, weights,
tokenizer, processor) that loads through ``AutoModelForImageTextToText`` and ``AutoProcessor``
exactly like a checkpoint a user brings.

The tokenizer is word-level, trained here with the ``tokenizers`` library on the given texts, with
the special tokens each architecture's processor expects.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BASE_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
ARCH_SPECIALS = {
    "llava": ["<image>"],
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}
ARCHITECTURES = tuple(ARCH_SPECIALS)


def train_word_tokenizer(
    texts: Iterable[str], specials: list[str], vocab_size: int = 4096
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer (words and punctuation) with BOS prepended."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=BASE_SPECIALS + specials)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        extra_special_tokens=None,
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def _text_config(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _llava_model(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int, hidden: int, layers: int
):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tokenizer, hidden, layers)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(config)


def _llava_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int, hidden: int):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
    )


IDEFICS3_SCALE = 2


def _idefics3_model(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int, hidden: int, layers: int
):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    vision = Idefics3VisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tokenizer, hidden, layers)),
        scale_factor=IDEFICS3_SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return Idefics3ForConditionalGeneration(config)


def _idefics3_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int, hidden: int):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    seq_len = (image_size // patch_size) ** 2 // (IDEFICS3_SCALE**2)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len)


def _qwen2_vl_model(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int, hidden: int, layers: int
):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    quarter = hidden // 2 // 4  # mrope sections split half the head dimension (temporal, height, width)
    text = _text_config(tokenizer, hidden, layers)
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": [quarter, quarter // 2 * 1, quarter // 2 * 1],
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=layers,
            embed_dim=hidden,
            hidden_size=hidden,
            num_heads=2,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_chans=3,
            mlp_ratio=2,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return Qwen2VLForConditionalGeneration(config)


def _qwen2_vl_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int, hidden: int):
    # Qwen2-VL's processor also needs its video processor, which transformers only provides with
    # torchvision; on machines without it the model is usable but no processor can be saved.
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=2, temporal_patch_size=2
    )
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


_MODELS = {"llava": _llava_model, "idefics3": _idefics3_model, "qwen2_vl": _qwen2_vl_model}
_PROCESSORS = {"llava": _llava_processor, "idefics3": _idefics3_processor, "qwen2_vl": _qwen2_vl_processor}


def build_tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> torch.nn.Module:
    """A random-weight model of ``arch`` sized for ``tokenizer`` (no processor, nothing saved)."""
    if arch not in _MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    model = _MODELS[arch](tokenizer, image_size, patch_size, hidden, layers)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def build_tiny_vlm(
    arch: str,
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build a random-weight VLM of ``arch`` with a tokenizer trained on ``texts``; save it to ``out_dir``."""
    tokenizer = train_word_tokenizer(texts, ARCH_SPECIALS[arch])
    model = build_tiny_model(
        arch, tokenizer, image_size=image_size, patch_size=patch_size, hidden=hidden, layers=layers, seed=seed
    )
    processor = _PROCESSORS[arch](tokenizer, image_size, patch_size, hidden)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
