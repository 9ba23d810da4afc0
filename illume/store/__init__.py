"""The feedback store and the adapter registry (SQLAlchemy 2; SQLite or PostgreSQL).

``FeedbackStore`` is the durable feedback log (generations, candidates, judgements, exports);
``AdapterRegistry`` keeps adapter versions, aliases, tuning rounds and the controller's lease in
the same database. Both are plain Python (no Ray, no protobuf); see docs/STORE.md.
"""

from illume.store.feedback import FeedbackStore, held_out_for
from illume.store.registry import AdapterRegistry, RegistryListener
from illume.store.settings import StoreSettings
from illume.store.types import (
    AdapterFeedbackStats,
    AdapterRecord,
    AliasRecord,
    CandidateRecord,
    FeedbackReceipt,
    FeedbackStats,
    FeedbackSubmission,
    GenerationRecord,
    Judgement,
    LeaseRecord,
    NewCandidate,
    NewGeneration,
    RoundRecord,
    adapter_name,
    candidate_id_for,
    new_id,
)

__all__ = [
    "AdapterFeedbackStats",
    "AdapterRecord",
    "AdapterRegistry",
    "AliasRecord",
    "CandidateRecord",
    "FeedbackReceipt",
    "FeedbackStats",
    "FeedbackStore",
    "FeedbackSubmission",
    "GenerationRecord",
    "Judgement",
    "LeaseRecord",
    "NewCandidate",
    "NewGeneration",
    "RegistryListener",
    "RoundRecord",
    "StoreSettings",
    "adapter_name",
    "candidate_id_for",
    "held_out_for",
    "new_id",
]
