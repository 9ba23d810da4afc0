"""The one configuration schema of the Serve application.

``AppConfig`` is what the application builder (``services.app:build_app``) receives as ``args``;
``serve run`` / ``serve deploy`` YAML, KubeRay's ``serveConfigV2`` and ``illume serve`` all produce
it, so they cannot drift. Each component gets its own settings model, built once here and passed
down; nothing reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from illume.evaluation.canary import CanaryConfig
from illume.evaluation.gate import ANSWER_ACCURACY, PREFERENCE, CuratedSetConfig, GateConfig
from illume.models.loading import ModelSettings
from illume.selection import SelectionConfig
from illume.store.settings import StoreSettings
from illume.training.round import TrainConfig
from illume.training.snapshot import SnapshotConfig
from illume.validation import RequestLimits

SERVICER_FUNCTIONS = [
    "illume.v1.illume_pb2_grpc.add_RationaleServiceServicer_to_server",
    "illume.v1.illume_pb2_grpc.add_FeedbackServiceServicer_to_server",
    "illume.v1.illume_pb2_grpc.add_AdminServiceServicer_to_server",
]
APP_NAME = "illume"
# Serve routes gRPC only to applications that have a route prefix (even though no HTTP is served).
ROUTE_PREFIX = "/"
DEFAULT_GRPC_PORT = 50051
# Lowered from Serve's default of about 2 GiB; a request is an image plus a little text.
DEFAULT_GRPC_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Settings):
    """Serve autoscaling of the Generator (replaces ``num_replicas`` when set)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(16, gt=0, description="Ongoing requests per replica to aim for.")


class GeneratorSettings(_Settings):
    """The Generator deployment: the model, batching and placement."""

    model: ModelSettings = Field(description="The base model (a local checkpoint directory).")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off.")
    autoscaling: AutoscalingSettings | None = Field(None, description="Autoscaling instead of a fixed count.")
    max_batch_size: int = Field(16, ge=1, le=512, description="Most requests in one generate call.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5, description="How long a batch waits to fill.")
    max_concurrent_batches: int = Field(1, ge=1, le=8, description="Batches one replica runs at once.")
    max_queued_requests: int = Field(
        256, ge=1, description="Requests waiting per replica before new ones get RESOURCE_EXHAUSTED."
    )
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per replica (also torch's thread count on CPU).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; >0 puts the model on CUDA.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 uses num_cpus rounded up.")
    adapter_cache_size: int = Field(4, ge=1, le=64, description="Adapter versions kept loaded (LRU).")
    adapter_poll_interval_s: float = Field(
        0.5, gt=0, description="Registry polling period, the fallback when no change notification arrives."
    )
    token_budget: int = Field(
        0,
        ge=0,
        description="Most tokens one batch may hold: the sum over its requests of prompt tokens + "
        "n x max_new_tokens (+ the answer's tokens when the model answers). 0 derives it: on CUDA from "
        "the free memory after loading x token_budget_memory_fraction / KV bytes per token; elsewhere "
        "65536 (docs/SERVING.md, 'Streaming and batching').",
    )
    token_budget_memory_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of the free accelerator memory a derived token budget fills with KV cache.",
    )

    @property
    def max_ongoing_requests(self) -> int:
        """Serve caps a batch at max_ongoing_requests; keep it at least batch x concurrency
        (docs/ARCHITECTURE.md, "Batching")."""
        return self.max_batch_size * self.max_concurrent_batches


class FeedbackLogSettings(_Settings):
    """The FeedbackLog deployment: the only writer of generations and feedback."""

    store: StoreSettings = Field(description="The database of the feedback log and the registry.")
    num_cpus: float = Field(0.25, gt=0, description="Ray CPUs of the replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent writes accepted (group commit).")


ALL_NAMESPACES = "*"
SUBMIT_ON_BEHALF = "submit_on_behalf"


class ApiKey(_Settings):
    """One API key: only its sha256 is configured, never the key itself."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the key's bytes.")
    role: Literal["client", "annotator", "admin"] = Field(description="What the key may call.")
    principal: str = Field(description="Who holds the key; the annotator id of its feedback.")
    namespaces: list[str] | None = Field(
        None,
        description='Namespaces the key may use; ["*"] for all. Absent (key files written before '
        "namespaces were scoped): all, with a warning at load (docs/SERVING.md, 'Keys').",
    )
    permissions: list[Literal["submit_on_behalf"]] = Field(
        default_factory=list,
        description="Extra grants: submit_on_behalf lets the key submit feedback under another "
        "annotator id (audited).",
    )

    @property
    def all_namespaces(self) -> bool:
        return self.namespaces is None or ALL_NAMESPACES in self.namespaces


class AuthSettings(_Settings):
    """Authentication from the gRPC metadata (``authorization: Bearer <key>``)."""

    enabled: bool = Field(True, description="Require an API key on every call.")
    keys: list[ApiKey] = Field(default_factory=list, description="Accepted keys.")
    keys_file: Path | None = Field(
        None,
        description="A JSON file of more keys (same fields); re-read when its content changes, "
        "checked at most every reload_interval_s.",
    )
    reload_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often the keys file (and the declared namespaces) are re-read."
    )


class IngressSettings(_Settings):
    """The Ingress deployment: validation, authorisation, routing."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.25, gt=0, description="Ray CPUs per replica.")
    max_ongoing_requests: int = Field(512, ge=1, description="Concurrent calls per replica.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Request limits and defaults.")
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Calls in flight get this long to finish when the server or a replica stops "
        "(SIGTERM, scale-down, upgrade); Serve's graceful_shutdown_timeout_s of every deployment is "
        "set to it, and a pod's terminationGracePeriodSeconds must exceed it (docs/DEPLOY.md).",
    )


class WebSettings(_Settings):
    """The annotation web app, served over HTTP by the Ingress deployment (services/web.py)."""

    enabled: bool = Field(True, description="Serve the judging and admin pages over HTTP.")
    session_secret_file: Path | None = Field(
        None,
        description="A file of at least 32 random bytes that encrypts and signs session cookies; every "
        "Ingress replica must read the same one (a mounted Secret on Kubernetes). Absent: a random "
        "secret per replica, so sessions end when the replica restarts and only one replica works.",
    )
    session_ttl_s: float = Field(
        8 * 3600.0, gt=0, le=7 * 24 * 3600, description="A session ends this long after sign-in."
    )
    cookie_secure: bool = Field(
        False,
        description="Mark the session cookie Secure (sent over HTTPS only); set behind a TLS gateway.",
    )
    sign_in_attempts_per_minute: int = Field(
        10, ge=1, le=1000, description="Sign-in attempts allowed per client address per minute (per replica)."
    )
    forwarded_for_hops: int = Field(
        0,
        ge=0,
        le=5,
        description="Proxies in front of Serve whose X-Forwarded-For entries are trusted (the TLS gateway "
        "on Kubernetes: 1). The sign-in rate limit counts per the address that many entries from the "
        "right; 0 counts per TCP peer (then everyone behind one proxy shares one limit).",
    )


def served_gate(**changes: object) -> GateConfig:
    """The server's gate: held-out preference, answers, and ROUGE-L as a guard against collapse.

    - **Preference** (5 points): how often each side ranks the annotators' accepted candidates
      above the rejected ones of the same held-out generation (lower loss). Both sides rank the
      same judged texts, so neither is scored against its own outputs. The caption metrics
      compare each side's greedy rationale with references production sampled: on four served
      runs they refused 11 of 14 rounds, among them adapters better than production on every
      gold measure (docs/STUDY.md, "A gate that ranks").
    - **Answers** (5 points): the rationale checks never look at answers, and a served round
      promoted on ROUGE-L lost 4.8 points of answers on 500 val items. 5 points lets a
      candidate lose one answer in twenty held-out items, not one in sixteen or fewer.
    - **ROUGE-L** (15 points): against production's samples a sound adapter lost up to 10.6
      points, so only a collapse of the greedy rationale (an adapter trained on harm) refuses.
      BLEU-4 and CIDEr are still scored and recorded, not compared.
    """
    return GateConfig(
        metrics=(PREFERENCE, ANSWER_ACCURACY, "ROUGE-L"),
        tolerance={PREFERENCE: 5.0, ANSWER_ACCURACY: 5.0, "ROUGE-L": 15.0},
        **changes,  # type: ignore[arg-type]
    )


WORLD_GATE_SET = "world"
WORLD_GATE_ITEMS = 500


def world_gate_set(path: Path) -> CuratedSetConfig:
    """The embedded model's curated gate set: ``WORLD_GATE_ITEMS`` questions of a world no round
    trains on, with gold explanations, judged by the fact critic on both sides.

    Why (docs/STUDY.md, "The gate drill"): on a dozen held-out generations the served gate promoted
    rounds trained on wrong rationales that lost 6-9 points of per-question acceptance on 500 gold
    items. Training on the model's own samples, wrong ones too, sharpens it, and that ranks the
    held-out accepted texts above the rejected ones more often, so preference rose for them as for
    a sound round. The curated set measures what the study decides on, per-question acceptance,
    and answers, on the same seeded samples on both sides.

    Size and tolerances (docs/STUDY.md, "How much a gold set can tell"): between two sound adapters
    the per-question delta on 500 items has a standard deviation of 1.1-1.8 points (median 1.5; 2.4
    on 200 items), the answers delta 0.6-1.2. 3.5 points per question is two deviations at the top
    of that range: an equal candidate is refused about once in fifty by noise, and a round 6 points
    worse on this world about nine times in ten. Measured on the trained world's own items a
    delta can differ by several points more (the drills on seed 15: a round 6.8 points worse there
    read -1.4 here), so this set stops large drops, not every 6-point one. Answers keep 3 points,
    since sound rounds lose 1-2 against production."""
    return CuratedSetConfig(
        path=path,
        metrics=("acceptance/fact", ANSWER_ACCURACY),
        tolerance={"acceptance/fact": 3.5, ANSWER_ACCURACY: 3.0},
        critics=("fact",),
        limit=WORLD_GATE_ITEMS,
        min_items=WORLD_GATE_ITEMS,
    )


class TuningSettings(_Settings):
    """Continual tuning: when rounds start, how they train, where they run."""

    enabled: bool = Field(True, description="Run the LoopController and allow tuning rounds.")
    namespaces: tuple[str, ...] = Field(("default",), description="Namespaces the controller watches.")
    min_new_judgements: int = Field(
        50, ge=1, description="Accepted judgements since the last round that start a new round."
    )
    check_interval_s: float = Field(10.0, gt=0, description="How often the controller looks for work.")
    lease_ttl_s: float = Field(60.0, gt=0, description="The controller's lease; another takes over after it.")
    jobs_api_address: str = Field(
        "",
        description="Ray Jobs API (the cluster's dashboard), for example KubeRay's stable head "
        "Service http://<rayservice-name>-head-svc:8265. Empty: the dashboard address the head "
        "registered in the cluster's GCS, looked up again after a connection failure.",
    )
    job_timeout_s: float = Field(3600.0, gt=0, description="A round's job is failed after this long.")
    schedule_timeout_s: float = Field(
        300.0, gt=0, description="A round whose training workers cannot be scheduled fails after this long."
    )
    max_resubmissions: int = Field(
        2,
        ge=0,
        description="Times the controller resubmits a round whose job was lost (cluster restart) or "
        "whose driver died; the resubmitted job resumes from the round's snapshot and last "
        "checkpoint. Beyond it the round fails with the reason.",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers of a round (data-parallel).")
    use_gpu: bool = Field(False, description="Train on GPUs (one per worker; the gate's evaluation too).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs per training worker (and of the gate's task)."
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each training worker requires (for example "
        '{"illume-train": 1}), so workers land only on training nodes; the gate\'s evaluation '
        "task asks for one worker's resources.",
    )
    entrypoint_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources the round's job driver requires (for example "
        '{"illume-train": 0.01}), so it runs on a training node; empty: Ray\'s default (the head).',
    )
    entrypoint_num_cpus: float = Field(
        0.0, ge=0, description="CPUs reserved for the round's job driver (snapshot, downloads, registry)."
    )
    max_failures: int = Field(
        2,
        ge=0,
        description="Ray Train FailureConfig.max_failures: a round survives this many lost or failed "
        "workers, each time resuming from its last epoch checkpoint.",
    )
    storage_path: str = Field(
        "",
        description="Ray Train storage (epoch checkpoints, the final adapter): an s3:// URI (reached "
        "with artifact_options) or a local path, which needs shared_filesystem or a one-node cluster. "
        "Empty: <artifact_uri>/ray-train.",
    )
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig, description="Snapshot building.")
    replay_data: str | None = Field(
        None,
        description="A VQA-X JSON file (images beside it) of answered questions from the deployment's "
        "domain; answer-only rows are topped up from it when the judged questions give fewer than "
        "the replay ratio asks for (None: judged questions only). Every training worker reads it.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training of each round.")
    gate: GateConfig = Field(
        default_factory=served_gate,
        description="The promotion gate. Unless gate.allow_empty, a round waits (the controller does not "
        "start it; a round started anyway ends rejected before training) while the held-out split "
        "holds fewer than gate.min_items usable items. By default it also compares held-out answer "
        "accuracy (tolerance 5 points), on the items whose answer the client sent or an annotator "
        "judged right.",
    )
    gate_max_items: int = Field(
        200, ge=1, description="Held-out generations the gate scores at most (newest)."
    )
    canary: CanaryConfig = Field(
        default_factory=CanaryConfig,
        description="The canary stage: a gate-passed adapter serves canary.share of unpinned traffic and "
        "the controller promotes it or rolls it back on live feedback (off: straight to production).",
    )
    keep_last: int = Field(10, ge=1, description="Adapter versions kept (aliased ones are always kept).")

    @model_validator(mode="after")
    def _check_gate(self) -> TuningSettings:
        if self.gate.min_items > self.gate_max_items:
            raise ValueError(
                f"tuning.gate.min_items ({self.gate.min_items}) exceeds tuning.gate_max_items "
                f"({self.gate_max_items}): the gate could never have enough evidence"
            )
        return self


class AppConfig(_Settings):
    """Everything the Serve application needs; the ``args`` of ``services.app:build_app``."""

    generator: GeneratorSettings = Field(description="Generator deployment.")
    feedback_log: FeedbackLogSettings = Field(description="FeedbackLog deployment.")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="Ingress deployment.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys and roles.")
    artifact_uri: str = Field(
        "", description="Where adapters are stored: a local directory or an s3:// prefix (empty: none yet)."
    )
    artifact_options: dict[str, str] = Field(
        default_factory=dict,
        description="fsspec storage options of an s3:// artifact store (endpoint_url, ...).",
    )
    tuning: TuningSettings = Field(default_factory=TuningSettings, description="Continual tuning.")
    web: WebSettings = Field(default_factory=WebSettings, description="The annotation web app (HTTP).")
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="The judging queue (NextItem)."
    )
    namespaces: list[str] = Field(
        default_factory=lambda: ["default"],
        description="Namespaces declared at start (added to those already declared in the store; "
        "never removed). Others are declared with the Admin DeclareNamespace RPC.",
    )
    shared_filesystem: bool = Field(
        False,
        description="Local paths (artifact_uri, tuning.storage_path, the store's image_dir, an SQLite "
        "database file) name the same files on every node (one machine, or a shared volume). False: "
        "a tuning round refuses them on a cluster of more than one node.",
    )
    serve_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources every serving replica asks for (for example "
        '{"illume-serve": 0.01}), so serving deployments land only on serving nodes.',
    )
    server_version: str = Field(
        "", description="Reported by GetServerStatus; the package version when empty."
    )
    access_log: bool = Field(
        False,
        description="Serve's access log: one INFO line per request in every replica's log. Off by "
        "default: on 2 cores it cost about a fifth of the feedback rate (docs/BENCHMARKS.md, "
        "'Feedback throughput'); requests are counted in the metrics either way.",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> AppConfig:
        if self.generator.autoscaling and self.generator.autoscaling.max_replicas < max(
            1, self.generator.autoscaling.min_replicas
        ):
            raise ValueError("generator.autoscaling.max_replicas must be >= min_replicas")
        return self


def _model_id(model_dir: Path) -> str:
    """The name a checkpoint's manifest gives it (the project's models have one), else its folder's."""
    import json

    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        name = json.loads(manifest.read_text()).get("name")
        if isinstance(name, str) and name:
            return name
    return model_dir.name


def default_config(
    data_dir: Path, model_dir: Path, replay_data: Path | None = None, gate_world: Path | None = None
) -> AppConfig:
    """The embedded default: the project's model, SQLite under ``data_dir``, local artifacts
    (and ``replay_data`` as the tuning rounds' replay pool, ``gate_world`` as the gate's curated
    set, ``world_gate_set``)."""
    data_dir = Path(data_dir)
    # The study's minimal-feedback recipe (docs/STUDY.md, "The served default"): the highest
    # per-question acceptance at a server's feedback rate with answers within 2 points. A rate
    # decaying linearly from 1e-3 keeps the answers there with the replay pool below; a constant
    # 1e-3 without it cost 5 points (docs/TRAINING.md).
    train = TrainConfig(learning_rate=1e-3, lr_schedule="linear", lora_r=16, lora_alpha=32)
    return AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=model_dir, model_id=_model_id(Path(model_dir)))),
        feedback_log=FeedbackLogSettings(
            store=StoreSettings(
                url=f"sqlite:///{data_dir / 'feedback.db'}",
                image_dir=data_dir / "images",
                # A fifth of the images: a round starts after 50 accepted judgements
                # (min_new_judgements), of which about 10 are held out, the gate's min_items.
                held_out_fraction=0.2,
            )
        ),
        artifact_uri=str(data_dir / "adapters"),
        # One machine: the data directory is the same for every Ray process.
        shared_filesystem=True,
        tuning=TuningSettings(
            storage_path=str(data_dir / "ray-train"),
            train=train,
            # With a replay pool each epoch gets answer rows of its own: a small model memorises
            # replay questions it sees every epoch, and its other answers slip.
            snapshot=SnapshotConfig(replay_passes=train.epochs if replay_data is not None else 1),
            replay_data=str(replay_data) if replay_data is not None else None,
            # No promotion without evidence: the first round waits until the held-out split holds
            # 10 usable items (a small model's laptop run; the fields' default is 20).
            gate=served_gate(
                min_items=10,
                allow_empty=False,
                tokenize=False,
                curated={WORLD_GATE_SET: world_gate_set(gate_world)} if gate_world is not None else {},
            ),
        ),
    )
