"""Vision-language models: loading local checkpoints, LoRA targeting, tiny builders."""

from illume.models.loading import LoadedModel, ModelSettings, load_model, lora_target_regex

__all__ = ["LoadedModel", "ModelSettings", "load_model", "lora_target_regex"]
