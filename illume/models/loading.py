"""Loading an image-text-to-text checkpoint from a local directory.

Any Hugging Face checkpoint that ``AutoModelForImageTextToText`` and ``AutoProcessor`` understand
loads here (the matrix of docs/ARCHITECTURES.md: LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3,
SmolVLM, PaliGemma, Gemma 3; the project's own default model). Where torchvision is missing, the
families whose processors also carry a video processor (Qwen2-VL, Qwen2.5-VL, SmolVLM) load an
image-only subclass of their processor (``image_only_processor_class``). Nothing
is ever downloaded: the path must be a local directory and loading runs with
``local_files_only=True``. The image processor uses the Pillow backend by default so preprocessing
is identical on CPU and GPU machines (docs/ARCHITECTURE.md, "Image preprocessing backend"). The
model is put in eval mode on the chosen device and dtype.

LoRA targets the language model only: ``lora_target_regex`` builds a peft ``target_modules`` regex
that matches the attention projections under the language model's module (``language_model`` for
LLaVA and Qwen2-VL, ``text_model`` for Idefics3/SmolVLM) and nothing in the vision tower.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from illume.errors import InvalidRequest

# Model types whose processors take one list of images per text row.
_NESTED_IMAGE_TYPES = {"idefics2", "idefics3", "smolvlm", "gemma3"}
# Module names under which each family keeps its language model.
_LANGUAGE_MODEL_NAMES = ("language_model", "text_model")
DEFAULT_LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class ModelSettings(BaseModel):
    """Where the base model lives and how it is placed."""

    path: Path = Field(description="Local checkpoint directory (never a hub id).")
    model_id: str = Field("", description="Id reported in replies; the directory name when empty.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."
    )
    image_backend: Literal["pil", "torchvision"] = Field("pil", description="Image processor backend.")
    image_placeholder: str = Field(
        "", description="Text that stands for the image in prompts; derived when empty."
    )


@dataclass
class LoadedModel:
    """A loaded model with its processor and the facts the generator needs."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    model_id: str
    model_type: str
    image_placeholder: str
    path: Path
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def nested_images(self) -> bool:
        return self.model_type in _NESTED_IMAGE_TYPES

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def fingerprint(self) -> str:
        """sha256 over the config and the weight files of the base checkpoint (hex)."""
        if self._fingerprint is None:
            self._fingerprint = base_model_fingerprint(self.path)
        return self._fingerprint


def base_model_fingerprint(path: str | Path) -> str:
    """A hash of a checkpoint's config and weights, used to refuse adapters trained on another base."""
    path = Path(path)
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(weights.name.encode())
        with weights.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def select_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def select_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def derive_image_placeholder(processor: Any, model_type: str) -> str:
    """The prompt text that the processor expands into image tokens for this family."""
    if model_type.startswith("qwen2") or model_type.startswith("qwen2_5"):
        return "<|vision_start|><|image_pad|><|vision_end|>"
    token = getattr(processor, "image_token", None)
    if not token:
        raise InvalidRequest(
            f"cannot tell the image token of model type {model_type!r}; set image_placeholder"
        )
    return str(token)


def torchvision_available() -> bool:
    """Whether torchvision imports here (transformers' video processors need it)."""
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


_IMAGE_ONLY_CLASSES: dict[str, type] = {}


def image_only_processor_class(model_type: str) -> type | None:
    """The family's processor class without its video processor, or None where none is needed.

    Contract: returns None when torchvision is importable or the family's processor takes no video
    processor (``AutoProcessor`` then loads it as usual). Otherwise (Qwen2-VL, Qwen2.5-VL, SmolVLM
    on a machine without torchvision, where transformers cannot build any video processor) it
    returns a subclass of the family's processor whose only difference is that it neither loads,
    checks nor saves a video processor (``video_processor`` is None): images and text are
    processed by the family's own code, and a video input fails. It carries the family's class
    name, which is what a checkpoint it saves records as its processor class (no video processor
    config is written; with torchvision, transformers then has to find one on its own: untested).
    """
    if torchvision_available():
        return None
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    base = getattr(transformers, name, None) if name else None
    if base is None or "video_processor" not in base.get_attributes():
        return None
    if name not in _IMAGE_ONLY_CLASSES:
        _IMAGE_ONLY_CLASSES[name] = _image_only(base)
    return _IMAGE_ONLY_CLASSES[name]


def _image_only(base: type) -> type:
    attributes = base.get_attributes()
    video_index = attributes.index("video_processor")

    class ImageOnly(base):  # type: ignore[misc, valid-type]
        video_processor = None

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in attributes if a != "video_processor"]

        @classmethod
        def _get_arguments_from_pretrained(cls, *args: Any, **kwargs: Any) -> list[Any]:
            loaded = super()._get_arguments_from_pretrained(*args, **kwargs)
            loaded.insert(video_index, None)  # the family's __init__ takes it positionally
            return loaded

    ImageOnly.__name__ = ImageOnly.__qualname__ = base.__name__
    ImageOnly.__doc__ = f"{base.__name__} without a video processor (no torchvision here)."
    return ImageOnly


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load the checkpoint of ``settings.path`` (local only), in eval mode, on the chosen device."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(settings.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local checkpoint directory (no config.json)")
    device = select_device(settings.device)
    dtype = select_dtype(settings.dtype, device)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    model_type = str(model.config.model_type)
    processor_class = image_only_processor_class(model_type)
    if processor_class is None:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, backend=settings.image_backend)
    else:
        processor = processor_class.from_pretrained(
            path, local_files_only=True, backend=settings.image_backend
        )
    processor.tokenizer.padding_side = "left"
    placeholder = settings.image_placeholder or derive_image_placeholder(processor, model_type)
    return LoadedModel(
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        model_id=settings.model_id or path.name,
        model_type=model_type,
        image_placeholder=placeholder,
        path=path,
    )


def language_model_prefix(model: torch.nn.Module) -> str:
    """The dotted name of the module holding the language model (first match wins)."""
    for name, _ in model.named_modules():
        if name.split(".")[-1] in _LANGUAGE_MODEL_NAMES:
            return name
    raise ValueError(
        f"no language model module ({' or '.join(_LANGUAGE_MODEL_NAMES)}) in {type(model).__name__}"
    )


def lora_target_regex(model: torch.nn.Module, projections: tuple[str, ...] = DEFAULT_LORA_PROJECTIONS) -> str:
    """A peft ``target_modules`` regex for the language model's projections only."""
    prefix = language_model_prefix(model).replace(".", r"\.")
    return rf"{prefix}\..*\.({'|'.join(projections)})"
