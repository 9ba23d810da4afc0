"""The tuning round job: snapshot -> Ray Train -> gate -> registry (a Ray job, or ``illume tune``).

Contract:
- it never runs on a Serve replica: the LoopController submits it through the Ray Jobs API
  (``python -m services.tuner ...``) and ``illume tune`` runs the same body from a shell;
- nothing crosses nodes by a local path: on a cluster of more than one alive node a round whose
  artifact store, Ray Train storage, image directory or SQLite database is a local path fails at
  once with the setting named, unless ``shared_filesystem`` declares those paths the same on
  every node;
- the snapshot is built from the feedback log (accepted rationales of every round so far,
  answer-only replay rows, topped up from the configured replay pool, the rationale loss weight;
  held-out generations never enter it), saved immutably under its sha256 in the artifact store
  (``<namespace>/snapshots/<sha256>``), and its row counts recorded on the round; a round that
  already recorded one (a resubmitted job) fetches that one and never rebuilds it;
- annotators with an uncleared flag are left out of the snapshot, and every annotator its
  agreement check flags anew is flagged in the store (``record_new_flags``) until an admin clears
  it (``ClearAnnotatorFlag``);
- training is a ``TorchTrainer`` of ``num_workers`` data-parallel workers (gloo on CPU) calling
  the core ``train_round`` (LoRA on the language model only); workers fetch the snapshot and the
  parent adapter from the artifact store, checkpoint the training state after every epoch into
  Ray Train's storage (run ``round-<round_id>``), and rank 0 reports the adapter as the run's last
  checkpoint, which the job downloads; a lost worker is replaced up to ``max_failures`` times and
  the run continues from the latest checkpoint, as does a resubmitted job's run of the same
  name; a round whose workers cannot be scheduled fails within ``schedule_timeout_s`` with the
  reason (see ``wait_for_resources`` for a cluster that autoscales);
- the gate runs as a Ray task with one training worker's resources: it scores the candidate and
  the current production on the same held-out generations (their accepted rationales as
  references) and promotes only a candidate that is not worse beyond the tolerance; the registry
  assigns the version either way (a rejected one is marked so);
- a new round whose held-out split holds fewer usable items than the gate's ``min_items`` (and
  ``allow_empty`` unset) ends ``rejected`` before its snapshot with "waiting for held-out
  evidence: <n> of <min_items> items" (the LoopController does not start such a round at all);
- with ``tuning.canary.enabled`` a gate-passed adapter goes to the ``canary`` alias with its
  ``share`` and the round ends the job in state ``canary`` (``scores.canary.started_at``); the
  LoopController then promotes it or rolls it back on live feedback and ends the round;
- the round record moves pending -> snapshot -> training -> evaluating -> [canary ->] promoted |
  rejected | failed, with a one-line reason; a failure anywhere leaves serving untouched.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from illume.adapters import CANARY, PRODUCTION
from illume.store import AdapterRegistry, FeedbackStore
from illume.store.types import RoundRecord, rfc3339, utcnow
from illume.training.snapshot import ReplayItem, Snapshot, build_snapshot
from services.config import AppConfig

log = logging.getLogger("illume.tuner")


def encode_config(config: AppConfig) -> str:
    return base64.urlsafe_b64encode(config.model_dump_json().encode()).decode()


def decode_config(text: str) -> AppConfig:
    return AppConfig.model_validate_json(base64.urlsafe_b64decode(text.encode()))


def _one_line(exc: BaseException) -> str:
    """A one-line reason; for errors that wrap a worker's traceback, the worker's own error line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    if causes:
        return causes[-1][:300]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


# --- where a round's files live ----------------------------------------------------------------


def snapshot_key(namespace: str, sha256: str) -> str:
    """The artifact key of a round's snapshot (immutable: named by its sha256)."""
    return f"{namespace}/snapshots/{sha256}"


def storage_uri(config: AppConfig) -> str:
    """Ray Train's storage: ``tuning.storage_path``, else ``<artifact_uri>/ray-train``."""
    if config.tuning.storage_path:
        return config.tuning.storage_path
    if config.artifact_uri:
        return config.artifact_uri.rstrip("/") + "/ray-train"
    return str(Path(tempfile.gettempdir()) / "illume-ray-train")


def node_local_locations(config: AppConfig) -> list[tuple[str, str]]:
    """(setting, value) of each location a round's processes share that is a path on one node."""
    from illume.adapters.artifacts import is_local_uri

    found = []
    if is_local_uri(config.artifact_uri):
        found.append(("artifact_uri", config.artifact_uri or "(empty: the working directory)"))
    if is_local_uri(storage_uri(config)):
        found.append(("tuning.storage_path", storage_uri(config)))
    store = config.feedback_log.store
    if store.image_dir is not None:
        found.append(("feedback_log.store.image_dir", str(store.image_dir)))
    if store.url.startswith("sqlite"):
        found.append(("feedback_log.store.url", store.url))
    return found


def check_locations(config: AppConfig, alive_nodes: int) -> None:
    """Refuse node-local paths on a cluster of several nodes unless ``shared_filesystem`` says
    every node sees the same files there (the round's workers and tasks may run on any node)."""
    if config.shared_filesystem or alive_nodes <= 1:
        return
    found = node_local_locations(config)
    if found:
        setting, value = found[0]
        raise RuntimeError(
            f"{setting} {value!r} is a path on one node but the cluster has {alive_nodes} nodes: "
            "use an s3:// location (or a database URL), or set shared_filesystem: true if every "
            "node mounts it at that path"
        )


def _connect_ray() -> int:
    """Connect to the cluster (a job's own, or a new local one from a shell); its alive nodes."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    return sum(1 for node in ray.nodes() if node.get("Alive"))


# --- waiting for the training workers' resources ---------------------------------------------

Bundle = dict[str, float]


def worker_bundle(tuning: Any) -> Bundle:
    """What one training worker (and the gate's task) asks Ray for."""
    return {
        "CPU": tuning.cpus_per_worker,
        **({"GPU": 1.0} if tuning.use_gpu else {}),
        **tuning.worker_resources,
    }


def bundles_fit(bundles: list[Bundle], nodes: list[Bundle]) -> bool:
    """Whether every bundle fits on some node at once (first fit, largest bundles first); a
    bundle never spans nodes, as a Ray Train worker cannot."""
    room = [dict(node) for node in nodes]
    for bundle in sorted(bundles, key=lambda b: sorted(b.items()), reverse=True):
        for node in room:
            if all(node.get(name, 0.0) >= amount for name, amount in bundle.items()):
                for name, amount in bundle.items():
                    node[name] = node.get(name, 0.0) - amount
                break
        else:
            return False
    return True


def _describe(bundles: list[Bundle]) -> str:
    kinds: dict[str, int] = {}
    for bundle in bundles:
        text = ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items()) if v)
        kinds[text] = kinds.get(text, 0) + 1
    return "; ".join(f"{n} x {{{text}}}" for text, n in kinds.items())


class RayClusterView:
    """The cluster as ``wait_for_resources`` sees it (tests pass a fake with the same methods)."""

    def free_per_node(self) -> list[Bundle]:
        from ray._private.state import available_resources_per_node

        return list(available_resources_per_node().values())

    def total_per_node(self) -> list[Bundle]:
        from ray._private.state import total_resources_per_node

        return list(total_resources_per_node().values())

    def autoscaler_running(self) -> bool:
        """An autoscaler v2 (KubeRay's, as the gpu overlay selects) reports its state to the GCS
        on every pass; a cluster without one never does (version 0)."""
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        try:
            status = get_cluster_status(ray.get_runtime_context().gcs_address)
        except Exception:
            log.warning("could not read the autoscaler's state; assuming no autoscaler", exc_info=True)
            return False
        return str(status.stats.autoscaler_version or "0") not in ("", "0")

    def request(self, bundles: list[Bundle]) -> None:
        """Ask the autoscaler for room for ``bundles`` ([] withdraws the request)."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)


def wait_for_resources(
    bundles: list[Bundle], timeout_s: float, cluster: Any = None, poll_s: float = 1.0
) -> bool:
    """Wait until the training workers' ``bundles`` fit on the cluster's free resources (per node,
    custom resources and GPUs included); returns whether the autoscaler was asked for nodes
    (the caller withdraws that request when the round's training ends).

    A cluster whose nodes together cannot hold the bundles fails at once, unless an autoscaler
    runs: then a group may scale up from zero (a GPU group), so the bundles are requested from it
    (``ray.autoscaler.sdk.request_resources``) and the wait lasts up to ``timeout_s`` like any
    other. The two are told apart by the GCS: an autoscaler v2 reports its state there on every
    pass (a non-zero ``autoscaler_state_version``); a cluster without one (a laptop, nodes
    started by hand, the test clusters) has none, so its current nodes are all it will ever
    have. Resources that exist but are busy are waited for up to ``timeout_s`` either way.
    """
    cluster = cluster or RayClusterView()
    deadline = time.monotonic() + timeout_s
    requested = False
    while True:
        if bundles_fit(bundles, cluster.free_per_node()):
            return requested
        if not requested and not bundles_fit(bundles, cluster.total_per_node()):
            if not cluster.autoscaler_running():
                raise RuntimeError(
                    f"training needs {_describe(bundles)} and the cluster's nodes cannot hold them "
                    "(no autoscaler runs to add nodes)"
                )
            cluster.request(bundles)
            requested = True
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"training workers could not be scheduled within {timeout_s:g}s "
                f"(need {_describe(bundles)} free"
                + (", requested from the autoscaler)" if requested else ")")
            )
        time.sleep(poll_s)


def replay_pool(replay_data: str | None) -> list[ReplayItem]:
    """The configured replay pool (empty when none is configured)."""
    from illume.training.replay import replay_pool_from_vqax

    return replay_pool_from_vqax(replay_data) if replay_data else []


# --- Ray Train -------------------------------------------------------------------------------

SNAPSHOT_FILE = "snapshot.json"
# The subdirectory of a run's last checkpoint that holds the trained adapter (epoch checkpoints
# hold the training state instead).
FINAL_ADAPTER = "illume-adapter"
# Tests only: JSON {"rank": R, "epoch": E, "marker": PATH} makes worker R die a few seconds
# after its epoch-E checkpoint, once (PATH records that it did), to show a round survives a lost
# worker. The delay lets Ray Train's controller collect that report first: it polls the workers
# every 2 s, and a report still queued in a dead worker is lost with it.
WORKER_EXIT_ENV = "ILLUME_TEST_WORKER_EXIT"
WORKER_EXIT_DELAY_S = 5.0


def _exit_once_after(spec: dict[str, Any] | None, rank: int) -> Callable[[int], None]:
    def after_checkpoint(epoch: int) -> None:
        if spec is None or rank != spec["rank"] or epoch != spec["epoch"]:
            return
        marker = Path(spec["marker"])
        if marker.exists():
            return
        marker.write_text(f"rank {rank} exited after epoch {epoch}\n")
        time.sleep(WORKER_EXIT_DELAY_S)
        os._exit(1)

    return after_checkpoint


def train_from_artifacts(
    cfg: dict[str, Any],
    work: Path,
    out_dir: Path,
    *,
    checkpoint: Callable[[int, dict[str, float], Path | None], None] | None = None,
    resume_from: Path | None = None,
    prepare_model: Callable[[Any], Any] | None = None,
    prepare_loader: Callable[[Any], Any] | None = None,
) -> Any:
    """One trainer's work on ``train_loop_config(...)``'s dict: fetch the snapshot (and the parent
    adapter) from the artifact store by URI, read images from the store, train into ``out_dir``.
    The Ray Train worker below wraps it; it needs no Ray itself. Returns the ``RoundResult``."""
    from illume.adapters.artifacts import open_artifact_store
    from illume.store import FeedbackStore, StoreSettings
    from illume.training.from_store import store_image_loader
    from illume.training.replay import with_file_images
    from illume.training.round import TrainConfig, train_round

    store = FeedbackStore(StoreSettings.model_validate(cfg["store"]))
    try:
        artifacts = open_artifact_store(cfg["artifact_uri"], cfg["artifact_options"] or None)
        snapshot = Snapshot.load(artifacts.get_dir(cfg["snapshot_uri"], work / "snapshot") / SNAPSHOT_FILE)
        parent = artifacts.get_dir(cfg["parent_uri"], work / "parent") if cfg.get("parent_uri") else None
        return train_round(
            snapshot,
            TrainConfig.model_validate(cfg["train"]),
            model_dir=cfg["model_dir"],
            image_loader=with_file_images(store_image_loader(store)),
            out_dir=out_dir,
            parent_adapter=parent,
            prepare_model=prepare_model,
            prepare_loader=prepare_loader,
            checkpoint=checkpoint,
            resume_from=resume_from,
        )
    finally:
        store.close()


def _train_worker(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: resume from the run's latest checkpoint if any, train
    (``train_from_artifacts``) with a checkpoint per epoch, and report the adapter as the run's
    last checkpoint (rank 0)."""
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    work = Path(tempfile.mkdtemp(prefix="illume-worker-"))
    try:
        latest = ray.train.get_checkpoint()
        resume_dir = Path(latest.to_directory(str(work / "resume"))) if latest is not None else None
        if resume_dir is not None and (resume_dir / FINAL_ADAPTER).is_dir():
            return  # the run had finished: its last checkpoint already holds the adapter
        exit_hook = _exit_once_after(cfg.get("test_exit"), rank)
        epochs_run: list[int] = []

        def checkpoint(epoch: int, metrics: dict[str, float], state_dir: Path | None) -> None:
            epochs_run.append(epoch)
            saved = ray.train.Checkpoint.from_directory(str(state_dir)) if state_dir is not None else None
            ray.train.report({**metrics, "epoch": epoch}, checkpoint=saved)
            exit_hook(epoch)

        final = work / "final"
        result = train_from_artifacts(
            cfg,
            work,
            final / FINAL_ADAPTER,
            checkpoint=checkpoint,
            resume_from=resume_dir,
            prepare_model=ray.train.torch.prepare_model,
            prepare_loader=ray.train.torch.prepare_data_loader,
        )
        metrics = {
            "final_loss": result.final_loss,
            "steps": result.steps,
            "resumed_after_epoch": (epochs_run[0] - 1) if epochs_run else 0,
        }
        saved = ray.train.Checkpoint.from_directory(str(final)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=saved)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_loop_config(config: AppConfig, snapshot_uri: str, parent_uri: str | None) -> dict[str, Any]:
    """What every trainer of a round gets: locations by URI, never a local path of the driver's
    node (the model directory is baked into every node's image; docs/DEPLOY.md)."""
    exit_spec = os.environ.get(WORKER_EXIT_ENV)
    return {
        "store": config.feedback_log.store.model_dump(mode="json"),
        "artifact_uri": config.artifact_uri,
        "artifact_options": dict(config.artifact_options),
        "snapshot_uri": snapshot_uri,
        "parent_uri": parent_uri,
        "train": config.tuning.train.model_dump(mode="json"),
        "model_dir": str(config.generator.model.path),
        "test_exit": json.loads(exit_spec) if exit_spec else None,
    }


def train_with_ray(
    config: AppConfig, snapshot_uri: str, round_id: str, out_dir: Path, parent_uri: str | None
) -> dict[str, Any]:
    """Run the round's ``TorchTrainer`` (run ``round-<round_id>`` in ``storage_uri(config)``) and
    copy the adapter of its last checkpoint to ``out_dir``.

    A run of that name already in the storage (a resubmitted round) continues from its latest
    checkpoint: Ray Train restores the run's checkpoint list from the storage and hands the
    latest to the workers as ``ray.train.get_checkpoint()``. Workers lost mid-run are replaced up
    to ``tuning.max_failures`` times, each time from the latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from illume.adapters.artifacts import arrow_filesystem

    tuning = config.tuning
    _connect_ray()
    bundle = worker_bundle(tuning)
    requested = wait_for_resources([bundle] * tuning.num_workers, tuning.schedule_timeout_s)
    filesystem, storage_path = arrow_filesystem(storage_uri(config), config.artifact_options)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=train_loop_config(config, snapshot_uri, parent_uri),
        scaling_config=ScalingConfig(
            num_workers=tuning.num_workers,
            use_gpu=tuning.use_gpu,
            resources_per_worker=bundle,
        ),
        run_config=RunConfig(
            name=f"round-{round_id}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=tuning.max_failures),
            # The latest epoch state to resume from, and the final adapter.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if requested:
            RayClusterView().request([])
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        adapter = Path(directory) / FINAL_ADAPTER
        if not adapter.is_dir():
            raise RuntimeError("the run's last checkpoint holds no adapter")
        shutil.copytree(adapter, out_dir)
    return dict(result.metrics or {})


# --- the gate --------------------------------------------------------------------------------


def _read_files(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _write_files(files: dict[str, bytes], directory: Path) -> Path:
    for name, data in files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return directory


def _gate_task(
    config: AppConfig, namespace: str, candidate: dict[str, bytes], production_uri: str | None
) -> tuple[Any, int]:
    """The gate's evaluation inside a Ray task (see ``evaluate_candidate``)."""
    from peft import PeftModel

    from illume.adapters.artifacts import open_artifact_store
    from illume.data import load_vqax
    from illume.evaluation.gate import evaluate_gate
    from illume.generation.generator import Generator
    from illume.models import load_model
    from illume.training.from_store import gate_items

    gate = config.tuning.gate
    work = Path(tempfile.mkdtemp(prefix="illume-gate-"))
    store = FeedbackStore(config.feedback_log.store)
    try:
        items = gate_items(store, namespace, config.tuning.gate_max_items)
        curated = {
            name: load_vqax(c.path, c.image_dir)[: c.limit]
            for name, c in gate.curated.items()
            if c.path is not None
        }
        # Served as configured (dtype, image backend), on the device this task was given.
        settings = config.generator.model.model_copy(
            update={"device": "cuda" if config.tuning.use_gpu else "cpu"}
        )
        loaded = load_model(settings)
        loaded.model = PeftModel.from_pretrained(
            loaded.model,
            _write_files(candidate, work / "candidate"),
            adapter_name="candidate",
            is_trainable=False,
        )
        production_name = None
        if production_uri is not None:
            artifacts = open_artifact_store(config.artifact_uri, config.artifact_options or None)
            local = artifacts.get_dir(production_uri, work / "production")
            loaded.model.load_adapter(local, adapter_name=PRODUCTION, is_trainable=False)
            production_name = PRODUCTION
        decision = evaluate_gate(Generator(loaded), "candidate", production_name, items, gate, curated)
        return decision, len(items)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)


def evaluate_candidate(
    config: AppConfig, namespace: str, candidate_dir: Path, production: Any
) -> tuple[Any, int]:
    """Score the candidate and production on the same held-out generations (and curated sets) and
    decide, in a Ray task with one training worker's resources (its CPUs, a GPU when ``use_gpu``,
    ``worker_resources``), so it runs where training ran. The candidate travels as bytes;
    production is fetched from the artifact store inside the task. Returns (decision, items)."""
    import ray

    tuning = config.tuning
    task = ray.remote(_gate_task).options(
        num_cpus=tuning.cpus_per_worker,
        num_gpus=1 if tuning.use_gpu else 0,
        resources=dict(tuning.worker_resources) or None,
    )
    production_uri = production.artifact_uri if production is not None else None
    return ray.get(task.remote(config, namespace, _read_files(candidate_dir), production_uri))


# --- the round -------------------------------------------------------------------------------


def _recorded_snapshot(artifacts: Any, namespace: str, sha256: str, work: Path) -> tuple[Snapshot, str]:
    """The snapshot a round already recorded, from the artifact store (never rebuilt: the store
    may have grown since)."""
    uri = artifacts.uri_for(snapshot_key(namespace, sha256))
    snapshot = Snapshot.load(artifacts.get_dir(uri, work / "snapshot") / SNAPSHOT_FILE)
    if snapshot.sha256 != sha256:
        raise RuntimeError(f"the stored snapshot {uri} is not {sha256}")
    return snapshot, uri


def record_new_flags(
    store: FeedbackStore, namespace: str, snapshot: Snapshot, already: frozenset[str], flagged_by: str
) -> list[str]:
    """Store a flag for every annotator the snapshot's agreement check flagged that ``already``
    (the uncleared flags) does not hold, so they stay out of later snapshots until an admin clears
    them; returns their ids. The tuning job is the writer of these flags (docs/ARCHITECTURE.md,
    "Who writes which table")."""
    new = [a for a in snapshot.manifest.annotator_agreement if a["flagged"] and a["annotator"] not in already]
    for found in new:
        store.flag_annotator(
            namespace,
            found["annotator"],
            reason=found["reason"],
            kappa=found["kappa"],
            overlap_items=found["overlap_items"],
            flagged_by=flagged_by,
        )
        log.warning("annotator %r of %r flagged: %s", found["annotator"], namespace, found["reason"])
    return [found["annotator"] for found in new]


def run_round(config: AppConfig, namespace: str, round_id: str) -> RoundRecord:
    """The whole round (see the module docstring); returns the final round record.

    A round that already recorded its snapshot (a resubmitted job) reuses it and continues
    training from the run's latest checkpoint."""
    from illume.adapters.artifacts import open_artifact_store
    from illume.adapters.manifest import publish_adapter
    from illume.evaluation.gate import waiting_for_evidence
    from illume.models.loading import base_model_fingerprint
    from illume.training.from_store import cleared_annotators, flagged_annotators, gate_evidence, judged_items

    store = FeedbackStore(config.feedback_log.store)
    registry = AdapterRegistry(store)
    artifacts = open_artifact_store(config.artifact_uri, config.artifact_options or None)
    work = Path(tempfile.mkdtemp(prefix=f"illume-round-{round_id}-"))
    record = registry.get_round(round_id)
    trigger = dict(record.scores)
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[f"{phase}_s"] = round(now - mark, 3)
        mark = now

    try:
        if not record.snapshot_sha256:
            # No training without the evidence to judge it: the gate would refuse it anyway.
            waiting = waiting_for_evidence(
                config.tuning.gate, gate_evidence(store, namespace, config.tuning.gate_max_items)
            )
            if waiting:
                return registry.update_round(round_id, "rejected", reason=waiting)
        check_locations(config, _connect_ray())
        if record.snapshot_sha256:
            snapshot, snapshot_uri = _recorded_snapshot(artifacts, namespace, record.snapshot_sha256, work)
            if record.state != "training":
                registry.update_round(round_id, "training")
        else:
            registry.update_round(round_id, "snapshot")
            flagged = flagged_annotators(store, namespace)
            snapshot = build_snapshot(
                judged_items(store, namespace),
                config.tuning.snapshot,
                replay_pool(config.tuning.replay_data),
                flagged_annotators=flagged,
                cleared_annotators=cleared_annotators(store, namespace),
            )
            record_new_flags(store, namespace, snapshot, flagged, f"round:{round_id}")
            if not snapshot.rationale_rows:
                return registry.update_round(
                    round_id, "rejected", reason="no accepted rationales to train on yet"
                )
            snapshot.save(work / "snapshot" / SNAPSHOT_FILE)
            snapshot_uri = artifacts.put_dir(work / "snapshot", snapshot_key(namespace, snapshot.sha256))
            registry.update_round(
                round_id,
                "training",
                snapshot_sha256=snapshot.sha256,
                rationale_rows=snapshot.rationale_rows,
                answer_rows=snapshot.answer_rows,
            )
        lap("snapshot")
        production = (
            registry.get(namespace, PRODUCTION) if PRODUCTION in registry.aliases(namespace) else None
        )
        parent_uri = (
            production.artifact_uri
            if production is not None and config.tuning.train.init_from == "parent"
            else None
        )
        adapter_dir = work / "adapter"
        train_metrics = train_with_ray(config, snapshot_uri, round_id, adapter_dir, parent_uri)
        lap("train")
        registry.update_round(round_id, "evaluating")
        decision, gate_count = evaluate_candidate(config, namespace, adapter_dir, production)
        lap("evaluation")
        parent_version = production.version if production else 0
        published = publish_adapter(
            registry,
            artifacts,
            adapter_dir,
            namespace=namespace,
            key=f"{namespace}/adapters/round-{round_id}",
            base_fingerprint=base_model_fingerprint(config.generator.model.path),
            snapshot_sha256=snapshot.sha256,
            parent_version=parent_version,
            train_config=config.tuning.train.model_dump(mode="json"),
            metrics={k: v for k, v in train_metrics.items() if isinstance(v, int | float)},
            code_version=_code_version(),
            round_id=round_id,
        )
        scores = {
            **trigger,
            "gate": {"candidate": decision.candidate, PRODUCTION: decision.production, "items": gate_count},
            "train": published.manifest.get("metrics", {}),
            "timings": timings,
        }
        canary = config.tuning.canary
        if decision.promote and canary.enabled:
            # The canary stage: the LoopController promotes it or rolls it back on live feedback.
            registry.set_alias(namespace, CANARY, published.version, share=canary.share)
            scores["canary"] = {
                "version": published.version,
                "share": canary.share,
                "started_at": rfc3339(utcnow()),
            }
            state = "canary"
            reason = f"gate passed; canary serving {canary.share:g} of traffic: {decision.reason}"
        elif decision.promote:
            registry.set_alias(namespace, PRODUCTION, published.version)
            state, reason = "promoted", decision.reason
        else:
            registry.mark_rejected(namespace, published.version, decision.reason)
            state, reason = "rejected", decision.reason
        lap("promotion")
        final = registry.update_round(
            round_id, state, reason=reason, adapter_version=published.version, scores=scores
        )
        for old in registry.apply_retention(namespace, config.tuning.keep_last):
            artifacts.delete(old.artifact_uri)
        return final
    except Exception as exc:
        log.exception("round %s failed", round_id)
        return registry.update_round(round_id, "failed", reason=_one_line(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        store.close()


def _code_version() -> str:
    import illume

    return illume.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one tuning round (Ray job entry point).")
    parser.add_argument("--config-b64", required=True, help="the AppConfig, base64 JSON")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--round-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    record = run_round(decode_config(args.config_b64), args.namespace, args.round_id)
    print(
        json.dumps(
            {
                "round_id": record.round_id,
                "state": record.state,
                "reason": record.reason,
                "adapter_version": record.adapter_version,
            }
        )
    )
    return 0 if record.state in ("promoted", "rejected", "canary") else 1


def configure_tune(parser: argparse.ArgumentParser) -> None:
    """run one tuning round now (snapshot, Ray Train, gate, registry)"""
    from services.local import add_app_arguments, tuning_flags

    add_app_arguments(parser, tuning_flags())
    parser.add_argument("--namespace", default="default")
    parser.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    """``illume tune``: one round from a shell (the body the LoopController submits as a job)."""
    from illume.cli import offline

    offline()
    from services.loop_controller import ACTIVE_STATES

    config = args.build_config(args)
    registry = AdapterRegistry.open(config.feedback_log.store)
    namespace = args.namespace or "default"
    active, _ = registry.list_rounds(namespace, page_size=1, states=ACTIVE_STATES)
    if active:
        print(f"error: round {active[0].round_id} is still {active[0].state}", file=sys.stderr)
        return 2
    record = registry.create_round(namespace, "pending")
    final = run_round(config, namespace, record.round_id)
    print(
        json.dumps(
            {
                "round_id": final.round_id,
                "state": final.state,
                "reason": final.reason,
                "adapter_version": final.adapter_version,
                "scores": dict(final.scores),
            },
            indent=1,
        )
    )
    return 0 if final.state in ("promoted", "rejected", "canary") else 1


if __name__ == "__main__":
    sys.exit(main())
