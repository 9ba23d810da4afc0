"""Tiny random checkpoints of every family in the architecture matrix (docs/ARCHITECTURES.md).

Each builder makes a random-weight model from a config and its processor from the family's Pillow
("slow") image processor and a word-level tokenizer trained here on the test texts (nothing is
downloaded), and saves both into a directory that ``illume.models.load_model`` loads like a
checkpoint a user brings. Sizes: hidden 32, 1-2 layers, 2 heads, 32-pixel images, a vocabulary of
a few dozen words, so every family builds, loads and generates in about a second on two cores.

``ARCHITECTURES`` lists, per family, the model type the loader reports, the module names the LoRA
targets must and must not fall under, and the Python modules the family needs beyond the
project's dependencies (a missing one skips that family with the reason).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from illume.models.loading import image_only_processor_class
from illume.models.tiny import ARCH_SPECIALS, build_tiny_vlm, train_word_tokenizer

HIDDEN = 32
LAYERS = 2
IMAGE = 32
PATCH = 8


def _tokenizer(
    texts: Iterable[str], specials: list[str], named: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (BOS prepended) whose ``named`` special tokens are also attributes.

    ``named`` maps attribute names (``image_token``, ``boi_token``...) to tokens of ``specials``,
    as the Gemma 3 and PaliGemma processors read them from the tokenizer.
    """
    base = train_word_tokenizer(texts, specials)
    if not named:
        return base
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        extra_special_tokens=named,
    )


def _text(tokenizer: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Ten times the usual spread: attention is then sharp enough that a wrong position or mask
        # changes the sampled tokens (at 0.02 it is nearly uniform and such errors hide).
        initializer_range=0.2,
    )
    config.update(extra)
    return config


def _clip() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=HIDDEN,
    )


def _siglip() -> Any:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
    )


def _save(model: torch.nn.Module, processor: Any, tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    for config in (model.generation_config,):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_llava_next(out: Path, texts: Iterable[str]) -> Path:
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = _tokenizer(texts, ["<image>"])
    pinpoints = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE]]
    config = LlavaNextConfig(
        vision_config=_clip(),
        text_config=LlamaConfig(**_text(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE},
        crop_size={"height": IMAGE, "width": IMAGE},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped again by "default"
    )
    return _save(model, processor, tokenizer, out)


def _qwen_processor(model_type: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=IMAGE * IMAGE,
        max_pixels=IMAGE * IMAGE,
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
    )
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    cls, video = _processor_class(model_type, name, "Qwen2VLVideoProcessor")
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video)


def _processor_class(model_type: str, name: str, video_name: str) -> tuple[type, Any]:
    """The processor class and video processor to build: image-only where torchvision is missing."""
    import transformers

    image_only = image_only_processor_class(model_type)
    if image_only is not None:
        return image_only, None
    return getattr(transformers, name), getattr(transformers, video_name)()


def _qwen_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def _mrope_text(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    half = HIDDEN // 2 // 2  # half the head dimension (hidden / heads / 2), split t / h / w
    return _text(
        tokenizer,
        rope_parameters={"rope_type": "default", "mrope_section": [half // 2, half // 4, half // 4]},
    )


def build_qwen2_vl(out: Path, texts: Iterable[str]) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = _tokenizer(texts, ARCH_SPECIALS["qwen2_vl"])
    config = Qwen2VLConfig(
        text_config=_mrope_text(tokenizer),
        vision_config=dict(
            depth=LAYERS,
            embed_dim=HIDDEN,
            hidden_size=HIDDEN,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_chans=3,
            mlp_ratio=2,
        ),
        **_qwen_ids(tokenizer),
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    return _save(model, _qwen_processor("qwen2_vl", tokenizer), tokenizer, out)


def build_qwen2_5_vl(out: Path, texts: Iterable[str]) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _tokenizer(texts, ARCH_SPECIALS["qwen2_vl"])
    config = Qwen2_5_VLConfig(
        text_config=_mrope_text(tokenizer),
        vision_config=dict(
            depth=LAYERS,
            hidden_size=HIDDEN,
            intermediate_size=HIDDEN * 2,
            out_hidden_size=HIDDEN,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=2 * PATCH * 2,  # two merged patches a side: windowed and full blocks differ
            fullatt_block_indexes=[LAYERS - 1],
        ),
        **_qwen_ids(tokenizer),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return _save(model, _qwen_processor("qwen2_5_vl", tokenizer), tokenizer, out)


def build_smolvlm(out: Path, texts: Iterable[str]) -> Path:
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )

    tokenizer = _tokenizer(texts, ARCH_SPECIALS["idefics3"])
    scale = 2
    config = SmolVLMConfig(
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=HIDDEN * 2,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            image_size=IMAGE,
            patch_size=PATCH,
        ),
        text_config=LlamaConfig(**_text(tokenizer)).to_dict(),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = SmolVLMForConditionalGeneration(config).eval()
    image_processor = SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IMAGE}, max_image_size={"longest_edge": IMAGE}
    )
    cls, video = _processor_class("smolvlm", "SmolVLMProcessor", "SmolVLMVideoProcessor")
    processor = cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video,
        image_seq_len=(IMAGE // PATCH) ** 2 // scale**2,
    )
    return _save(model, processor, tokenizer, out)


def build_paligemma(out: Path, texts: Iterable[str]) -> Path:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = _tokenizer(texts, ["<image>"], {"image_token": "<image>"})
    config = PaliGemmaConfig(
        vision_config=_siglip(),
        text_config=GemmaConfig(**_text(tokenizer, head_dim=HIDDEN // 2)),
        image_token_id=tokenizer.image_token_id,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    image_processor.image_seq_length = (IMAGE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(model, processor, tokenizer, out)


GEMMA3_SLIDING_WINDOW = 8  # shorter than every prompt, so the sliding layers really slide


def build_gemma3(out: Path, texts: Iterable[str]) -> Path:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = _tokenizer(texts, list(named.values()), named)
    text = Gemma3TextConfig(
        **_text(
            tokenizer,
            head_dim=HIDDEN // 2,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        )
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip(),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)
    return _save(model, processor, tokenizer, out)


def _project_builder(arch: str) -> Callable[[Path, Iterable[str]], Path]:
    def build(out: Path, texts: Iterable[str]) -> Path:
        return build_tiny_vlm(arch, out, texts, seed=0)

    return build


@dataclass(frozen=True)
class Architecture:
    """One family of the matrix: how to build it and what its LoRA targets must look like."""

    name: str
    model_type: str
    build: Callable[[Path, Iterable[str]], Path]
    language_model: str  # the module the LoRA targets live under
    vision: str  # the vision encoder's module (no LoRA target under it)
    requires: tuple[str, ...] = ()


ARCHITECTURES = (
    Architecture("llava", "llava", _project_builder("llava"), "language_model", "vision_tower"),
    Architecture("llava_next", "llava_next", build_llava_next, "language_model", "vision_tower"),
    Architecture("qwen2_vl", "qwen2_vl", build_qwen2_vl, "language_model", "visual"),
    Architecture("qwen2_5_vl", "qwen2_5_vl", build_qwen2_5_vl, "language_model", "visual"),
    Architecture("idefics3", "idefics3", _project_builder("idefics3"), "text_model", "vision_model"),
    Architecture("smolvlm", "smolvlm", build_smolvlm, "text_model", "vision_model", ("num2words",)),
    Architecture("paligemma", "paligemma", build_paligemma, "language_model", "vision_tower"),
    Architecture("gemma3", "gemma3", build_gemma3, "language_model", "vision_tower"),
)

# Image tokens of one 32x32 image in each tiny config (a 336-pixel LLaVA-1.5 has 576).
IMAGE_TOKENS = {
    "llava": 17,  # 4x4 patches + the class token ("full")
    "llava_next": 36,  # 4x4 base + 4x4 tile + a newline per tile row ("default" drops the class token)
    "qwen2_vl": 4,  # 4x4 patches merged 2x2
    "qwen2_5_vl": 4,
    "idefics3": 4,  # 4x4 patches, pixel-shuffled by 2
    "smolvlm": 4,
    "paligemma": 16,  # 4x4 patches
    "gemma3": 4,  # 4x4 patches pooled to 2x2 (mm_tokens_per_image)
}
