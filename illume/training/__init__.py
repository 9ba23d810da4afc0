"""ILLUME tuning rounds: snapshots of judged feedback and the LoRA training round body.

No Ray imports: ``services/`` runs ``train_round`` inside a Ray Train worker and passes Ray's
``prepare_model`` / ``prepare_data_loader`` as hooks. See docs/TRAINING.md.
"""

from illume.training.round import (
    RoundResult,
    TrainConfig,
    adapter_sha256,
    snapshot_loss,
    train_round,
)
from illume.training.snapshot import (
    JudgedItem,
    ReplayItem,
    Snapshot,
    SnapshotConfig,
    SnapshotManifest,
    SnapshotRow,
    build_snapshot,
    loss_weight,
    normalise_rationale,
)

__all__ = [
    "JudgedItem",
    "ReplayItem",
    "RoundResult",
    "Snapshot",
    "SnapshotConfig",
    "SnapshotManifest",
    "SnapshotRow",
    "TrainConfig",
    "adapter_sha256",
    "build_snapshot",
    "loss_weight",
    "normalise_rationale",
    "snapshot_loss",
    "train_round",
]
