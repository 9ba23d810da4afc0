"""The synthetic visual-reasoning world of the embedded default model.

Scenes of simple objects on a grid, rendered with Pillow; questions in five families with
single-word answers; several gold rationales per item rendered from structured facts; distractor
rationales for pretraining; and a grammar that checks rationales against the scene graph (used by
``illume.critics.fact.FactCritic``). Everything is seeded and deterministic; nothing here imports
Ray or torch. See docs/WORLD.md.
"""

from illume.world.build import SPLITS, WorldItem, build_world, generate, generate_split
from illume.world.distractors import distractor_rationales, tagged_distractors
from illume.world.language import gold_rationales
from illume.world.questions import FAMILIES, Question, ask
from illume.world.scene import WorldConfig, object_features, render_scene, sample_scene, scene_key
from illume.world.texts import world_texts
from illume.world.vocab import lexicon

__all__ = [
    "FAMILIES",
    "SPLITS",
    "Question",
    "WorldConfig",
    "WorldItem",
    "ask",
    "build_world",
    "distractor_rationales",
    "generate",
    "generate_split",
    "gold_rationales",
    "lexicon",
    "object_features",
    "render_scene",
    "sample_scene",
    "scene_key",
    "tagged_distractors",
    "world_texts",
]
