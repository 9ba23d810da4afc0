"""The tuning round job: snapshot -> Ray Train -> gate -> registry (a Ray job, or ``illume tune``).

Contract:
- it never runs on a Serve replica: the LoopController submits it through the Ray Jobs API
  (``python -m services.tuner ...``) and ``illume tune`` runs the same body from a shell;
- the snapshot is built from the feedback log (accepted rationales of every round so far,
  answer-only replay rows, topped up from the configured replay pool, the rationale loss weight;
  held-out generations never enter it), saved
  immutably under its sha256 in the artifact store, and its row counts recorded on the round;
- training is a ``TorchTrainer`` calling the core ``train_round`` on each worker (LoRA on the
  language model only); a round whose workers cannot be scheduled fails within
  ``schedule_timeout_s`` with the reason;
- the gate scores the candidate and the current production on the same held-out generations
  (their accepted rationales as references) and promotes only a candidate that is not worse beyond
  the tolerance; the registry assigns the version either way (a rejected one is marked so);
- the round record moves pending -> snapshot -> training -> evaluating -> promoted | rejected |
  failed, with a one-line reason; a failure anywhere leaves serving untouched.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from illume.adapters import PRODUCTION
from illume.store import AdapterRegistry, FeedbackStore
from illume.store.types import RoundRecord
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


def wait_for_resources(cpus: float, gpus: float, timeout_s: float) -> None:
    """Fail with a clear reason when the cluster cannot give the training workers what they need."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        total = ray.cluster_resources()
        if total.get("CPU", 0) < cpus or total.get("GPU", 0) < gpus:
            raise RuntimeError(
                f"training needs {cpus:g} CPUs and {gpus:g} GPUs; the cluster has "
                f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs in all"
            )
        free = ray.available_resources()
        if free.get("CPU", 0) >= cpus and free.get("GPU", 0) >= gpus:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"training workers could not be scheduled within {timeout_s:g}s "
                f"(need {cpus:g} CPUs/{gpus:g} GPUs free, have {free.get('CPU', 0):g}/{free.get('GPU', 0):g})"
            )
        time.sleep(1.0)


def replay_pool(replay_data: str | None) -> list[ReplayItem]:
    """The configured replay pool (empty when none is configured)."""
    from illume.training.replay import replay_pool_from_vqax

    return replay_pool_from_vqax(replay_data) if replay_data else []


def _train_worker(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: the core train_round with Ray's model and loader preparation."""
    import ray.train
    import ray.train.torch

    from illume.store import FeedbackStore, StoreSettings
    from illume.training.from_store import store_image_loader
    from illume.training.replay import with_file_images
    from illume.training.round import TrainConfig, train_round

    store = FeedbackStore(StoreSettings.model_validate(cfg["store"]))
    context = ray.train.get_context()
    out = Path(tempfile.mkdtemp(prefix="illume-adapter-"))

    def report(epoch: int, metrics: dict[str, float]) -> None:
        ray.train.report({"epoch": epoch, **metrics})

    try:
        result = train_round(
            Snapshot.load(cfg["snapshot_path"]),
            TrainConfig.model_validate(cfg["train"]),
            report,
            model_dir=cfg["model_dir"],
            image_loader=with_file_images(store_image_loader(store)),
            out_dir=out,
            parent_adapter=cfg.get("parent_adapter"),
            prepare_model=ray.train.torch.prepare_model,
            prepare_loader=ray.train.torch.prepare_data_loader,
        )
        checkpoint = (
            ray.train.Checkpoint.from_directory(str(result.adapter_dir))
            if context.get_world_rank() == 0
            else None
        )
        ray.train.report({"final_loss": result.final_loss, "steps": result.steps}, checkpoint=checkpoint)
    finally:
        store.close()


def train_with_ray(
    config: AppConfig, snapshot_path: Path, round_id: str, out_dir: Path, parent_adapter: Path | None
) -> dict[str, Any]:
    """Run ``TorchTrainer`` and copy the adapter of its checkpoint to ``out_dir``."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tuning = config.tuning
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    wait_for_resources(
        tuning.num_workers * tuning.cpus_per_worker,
        tuning.num_workers if tuning.use_gpu else 0,
        tuning.schedule_timeout_s,
    )
    storage = tuning.storage_path or str(
        Path(config.artifact_uri or tempfile.gettempdir()).resolve() / "ray-train"
    )
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "store": config.feedback_log.store.model_dump(mode="json"),
            "snapshot_path": str(snapshot_path),
            "train": tuning.train.model_dump(mode="json"),
            "model_dir": str(config.generator.model.path),
            "parent_adapter": str(parent_adapter) if parent_adapter else None,
        },
        scaling_config=ScalingConfig(
            num_workers=tuning.num_workers,
            use_gpu=tuning.use_gpu,
            resources_per_worker={"CPU": tuning.cpus_per_worker, **({"GPU": 1} if tuning.use_gpu else {})},
        ),
        run_config=RunConfig(name=f"round-{round_id}", storage_path=storage),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(directory, out_dir, dirs_exist_ok=True)
    return dict(result.metrics or {})


def _gate(
    config: AppConfig, store: FeedbackStore, namespace: str, candidate_dir: Path, production: Any
) -> Any:
    """Score the candidate and production on the same held-out generations (and curated sets); decide."""
    from peft import PeftModel

    from illume.adapters.artifacts import open_artifact_store
    from illume.data import load_vqax
    from illume.evaluation.gate import evaluate_gate
    from illume.generation.generator import Generator
    from illume.models import ModelSettings, load_model
    from illume.training.from_store import gate_items

    gate = config.tuning.gate
    items = gate_items(store, namespace, config.tuning.gate_max_items)
    curated = {
        name: load_vqax(c.path, c.image_dir)[: c.limit]
        for name, c in gate.curated.items()
        if c.path is not None
    }
    loaded = load_model(ModelSettings(path=config.generator.model.path))
    loaded.model = PeftModel.from_pretrained(
        loaded.model, candidate_dir, adapter_name="candidate", is_trainable=False
    )
    production_name = None
    if production is not None:
        local = Path(tempfile.mkdtemp(prefix="illume-production-"))
        open_artifact_store(config.artifact_uri, config.artifact_options or None).get_dir(
            production.artifact_uri, local
        )
        loaded.model.load_adapter(local, adapter_name=PRODUCTION, is_trainable=False)
        production_name = PRODUCTION
    return evaluate_gate(Generator(loaded), "candidate", production_name, items, gate, curated), len(items)


def run_round(config: AppConfig, namespace: str, round_id: str) -> RoundRecord:
    """The whole round (see the module docstring); returns the final round record."""
    from illume.adapters.artifacts import open_artifact_store
    from illume.adapters.manifest import publish_adapter
    from illume.models.loading import base_model_fingerprint
    from illume.training.from_store import judged_items

    store = FeedbackStore(config.feedback_log.store)
    registry = AdapterRegistry(store)
    artifacts = open_artifact_store(config.artifact_uri, config.artifact_options or None)
    work = Path(tempfile.mkdtemp(prefix=f"illume-round-{round_id}-"))
    trigger = dict(registry.get_round(round_id).scores)
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[f"{phase}_s"] = round(now - mark, 3)
        mark = now

    try:
        registry.update_round(round_id, "snapshot")
        snapshot = build_snapshot(
            judged_items(store, namespace), config.tuning.snapshot, replay_pool(config.tuning.replay_data)
        )
        if not snapshot.rationale_rows:
            return registry.update_round(
                round_id, "rejected", reason="no accepted rationales to train on yet"
            )
        snapshot_path = work / "snapshot.json"
        snapshot.save(snapshot_path)
        artifacts.put_dir(snapshot_path.parent, f"{namespace}/snapshots/{snapshot.sha256}")
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
        parent_dir = None
        if production is not None and config.tuning.train.init_from == "parent":
            parent_dir = artifacts.get_dir(production.artifact_uri, work / "parent")
        adapter_dir = work / "adapter"
        train_metrics = train_with_ray(config, snapshot_path, round_id, adapter_dir, parent_dir)
        lap("train")
        registry.update_round(round_id, "evaluating")
        decision, gate_count = _gate(config, store, namespace, adapter_dir, production)
        lap("evaluation")
        parent_version = production.version if production else 0
        record = publish_adapter(
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
            "train": record.manifest.get("metrics", {}),
            "timings": timings,
        }
        if decision.promote:
            registry.set_alias(namespace, PRODUCTION, record.version)
        else:
            registry.mark_rejected(namespace, record.version, decision.reason)
        lap("promotion")
        final = registry.update_round(
            round_id,
            "promoted" if decision.promote else "rejected",
            reason=decision.reason,
            adapter_version=record.version,
            scores=scores,
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
    return 0 if record.state in ("promoted", "rejected") else 1


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
    return 0 if final.state in ("promoted", "rejected") else 1


if __name__ == "__main__":
    sys.exit(main())
