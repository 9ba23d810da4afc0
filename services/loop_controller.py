"""The LoopController deployment: decides when a tuning round runs and submits it as a Ray job.

Contract:
- exactly one round at a time per namespace, across replicas and restarts: the controller acts
  only while it holds the ``loop-controller`` lease row in the store (renewed every check; another
  replica takes over after ``lease_ttl_s``), and refuses to start a round while one is unfinished;
- a round starts when at least ``min_new_judgements`` accepted judgements arrived since the last
  one, or on demand (``start_round``, the Admin StartTuningRound RPC; ``force`` skips the count);
- the round body runs as a Ray job (``services.tuner``) submitted through the Ray Jobs API to the
  same cluster, never on a replica's event loop; the job writes the round's progress itself;
- a round whose job ended without finishing the round (crash, stop, lost in a restart) or ran past
  ``job_timeout_s`` is marked failed with the reason, so the next one can start.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from ray import serve

from illume.errors import FailedPrecondition
from illume.store import AdapterRegistry, FeedbackStore
from illume.store.types import TERMINAL_ROUND_STATES, Actor, RoundRecord
from services.config import AppConfig
from services.tuner import encode_config

log = logging.getLogger("ray.serve")
LEASE = "loop-controller"
ACTIVE_STATES = ("pending", "snapshot", "training", "evaluating")
JOB_ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}
SUBMIT_GRACE_S = 120.0
# Rounds the controller starts on its own are audited under this principal.
CONTROLLER_ACTOR = Actor("system:loop-controller")


class LoopControllerCore:
    """The controller's logic, independent of Serve (a deployment wraps it; tests drive it)."""

    def __init__(self, config: AppConfig, holder: str | None = None, jobs: Any = None) -> None:
        self.config = config
        self.tuning = config.tuning
        self.store = FeedbackStore(config.feedback_log.store)
        self.registry = AdapterRegistry(self.store)
        self.holder = holder or f"controller-{uuid.uuid4().hex[:8]}"
        self._jobs = jobs
        self._lock = threading.Lock()

    @property
    def jobs(self) -> Any:
        if self._jobs is None:
            from ray.job_submission import JobSubmissionClient

            self._jobs = JobSubmissionClient(self.tuning.jobs_api_address)
        return self._jobs

    def holds_lease(self) -> bool:
        return self.registry.acquire_lease(LEASE, self.holder, self.tuning.lease_ttl_s)

    def accepted_judgements(self, namespace: str) -> int:
        return int(self.store.stats(namespace).selected)

    def active_round(self, namespace: str) -> RoundRecord | None:
        rounds, _ = self.registry.list_rounds(namespace, page_size=10, states=ACTIVE_STATES)
        return rounds[0] if rounds else None

    def _accepted_at_last_round(self, namespace: str) -> int:
        rounds, _ = self.registry.list_rounds(namespace, page_size=1)
        return int(rounds[0].scores.get("trigger", {}).get("accepted", 0)) if rounds else 0

    def new_judgements(self, namespace: str) -> int:
        return self.accepted_judgements(namespace) - self._accepted_at_last_round(namespace)

    def start_round(self, namespace: str, force: bool = False, actor: Actor | None = None) -> RoundRecord:
        """Create the round record and submit its job (FailedPrecondition when it may not start).
        The round's creation is audited (``round.start``) under ``actor`` (the admin who asked, or
        the controller itself)."""
        with self._lock:
            if not self.tuning.enabled:
                raise FailedPrecondition("tuning is disabled")
            if not self.holds_lease():
                raise FailedPrecondition("another controller holds the round lease; retry shortly")
            active = self.active_round(namespace)
            if active is not None:
                raise FailedPrecondition(f"round {active.round_id} is still {active.state}")
            accepted, new = self.accepted_judgements(namespace), self.new_judgements(namespace)
            needed = self.tuning.min_new_judgements
            if not force and new < needed:
                raise FailedPrecondition(f"{new} new accepted judgements since the last round; need {needed}")
            record = self.registry.create_round(
                namespace,
                "pending",
                actor=actor or CONTROLLER_ACTOR,
                arguments={"force": force, "accepted": accepted, "new": new},
            )
            self.registry.update_round(
                record.round_id, scores={"trigger": {"accepted": accepted, "new": new}}
            )
            job_id = self._submit(namespace, record.round_id)
            return self.registry.update_round(record.round_id, job_id=job_id)

    def _submit(self, namespace: str, round_id: str) -> str:
        entrypoint = (
            f"{sys.executable} -m services.tuner --namespace {namespace} --round-id {round_id} "
            f"--config-b64 {encode_config(self.config)}"
        )
        try:
            return self.jobs.submit_job(
                entrypoint=entrypoint,
                submission_id=f"illume-round-{round_id}",
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
            )
        except Exception as exc:
            self.registry.update_round(round_id, "failed", reason=f"could not submit the job: {exc}"[:300])
            raise FailedPrecondition(
                f"could not submit the round's job: {str(exc).splitlines()[0][:200]}"
            ) from exc

    def check_round(self, record: RoundRecord) -> RoundRecord:
        """Fail a round whose job ended without finishing it, or that ran too long."""
        age = (datetime.now(UTC) - record.started_at).total_seconds()
        if not record.job_id:
            if age > SUBMIT_GRACE_S:
                return self.registry.update_round(
                    record.round_id, "failed", reason="lost before its job started"
                )
            return record
        try:
            status = str(self.jobs.get_job_status(record.job_id)).split(".")[-1]
        except Exception as exc:
            if "does not exist" in str(exc) or "not found" in str(exc).lower():
                return self.registry.update_round(
                    record.round_id, "failed", reason="its job was lost (restart?)"
                )
            raise
        if status in JOB_ENDED:
            fresh = self.registry.get_round(record.round_id)
            if fresh.state not in TERMINAL_ROUND_STATES:
                return self.registry.update_round(record.round_id, "failed", reason=f"its job ended {status}")
            return fresh
        if age > self.tuning.job_timeout_s:
            self.jobs.stop_job(record.job_id)
            return self.registry.update_round(record.round_id, "failed", reason="job timeout")
        return record

    def tick(self) -> None:
        """One pass: keep the lease, watch running rounds, start due ones."""
        if not self.tuning.enabled or not self.holds_lease():
            return
        for namespace in self.tuning.namespaces:
            active = self.active_round(namespace)
            if active is not None:
                self.check_round(active)
            elif self.new_judgements(namespace) >= self.tuning.min_new_judgements:
                try:
                    self.start_round(namespace)
                except FailedPrecondition as exc:
                    log.info("round not started: %s", exc.reason)

    def close(self) -> None:
        self.registry.release_lease(LEASE, self.holder)
        self.store.close()


@serve.deployment
class LoopController:
    """Runs ``LoopControllerCore.tick`` every ``check_interval_s`` in a background thread."""

    def __init__(self, config: AppConfig) -> None:
        self.core = LoopControllerCore(config)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="illume-loop-controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.core.tuning.check_interval_s):
            try:
                self.core.tick()
            except Exception:
                log.exception("loop controller pass failed")

    async def start_round(
        self, namespace: str, force: bool = False, actor: Actor | None = None
    ) -> RoundRecord:
        return await asyncio.to_thread(self.core.start_round, namespace, force, actor)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the loop controller thread stopped")

    def __del__(self) -> None:
        self._stop.set()


__all__ = ["LoopController", "LoopControllerCore"]
