"""The LoopController deployment: decides when a tuning round runs and submits it as a Ray job.

Contract:
- exactly one round at a time per namespace, across replicas and restarts: the controller acts
  only while it holds the ``loop-controller`` lease row in the store (renewed every check; another
  replica takes over after ``lease_ttl_s``), and refuses to start a round while one is unfinished;
- a round starts when at least ``min_new_judgements`` accepted judgements arrived since the last
  one, or on demand (``start_round``, the Admin StartTuningRound RPC; ``force`` skips the count);
- the round body runs as a Ray job (``services.tuner``) submitted through the Ray Jobs API to the
  same cluster, never on a replica's event loop, its driver placed by ``entrypoint_resources``
  and ``entrypoint_num_cpus``; the job writes the round's progress itself. The Jobs API address
  is ``jobs_api_address``, or (empty) the dashboard address the head registered in the cluster's
  GCS, looked up again after a failed connection; with ``RAY_AUTH_MODE=token`` in the
  environment Ray's client sends the cluster token itself;
- after a restart of the controller the unfinished round is watched again: a round whose job
  still runs is re-attached; a round whose job is gone (a cluster restart) or whose driver died
  (the job FAILED without finishing the round) is resubmitted under the same round id, at most
  ``max_resubmissions`` times (the job ids ``illume-round-<round_id>``, then ``...-retry-<n>``),
  and the new job reuses the round's snapshot and resumes from the last checkpoint; beyond that,
  or when its job was stopped, or past ``job_timeout_s``, the round is marked failed with the
  reason, so the next one can start;
- no round starts, even on demand with ``force``, while the held-out split holds fewer usable
  items than the gate's ``min_items`` (unless ``gate.allow_empty``): ``start_round`` answers
  FailedPrecondition "waiting for held-out evidence: <n> of <min_items> items" and ``tick`` keeps
  the reason in ``waiting[namespace]`` (logged once per change) until the split fills;
- a round in state ``canary`` (``tuning.canary.enabled``: the gate passed and the adapter serves
  the canary share) is judged on every pass by ``illume.evaluation.canary.decide_canary`` on the
  feedback of generations created since the canary started: it waits for ``min_sample`` judged
  generations on each side, then moves production to the canary's version, or rolls it back
  (the ``canary`` alias removed, the version marked rejected, production untouched); a canary
  still short of its sample ``canary.max_wait_s`` after it started (the controller's clock,
  ``now``) is decided by ``canary.on_timeout`` instead (promote by default); the round ends
  promoted or rejected with the reason, and the compared numbers in ``scores.canary``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ray import serve

from illume.adapters import CANARY, PRODUCTION
from illume.errors import FailedPrecondition
from illume.evaluation.canary import ArmStats, decide_canary, tally
from illume.evaluation.gate import waiting_for_evidence
from illume.store import AdapterRegistry, FeedbackStore
from illume.store.types import TERMINAL_ROUND_STATES, Actor, RoundRecord, parse_rfc3339
from illume.training.from_store import gate_evidence
from services.config import AppConfig
from services.tuner import encode_config

log = logging.getLogger("ray.serve")
LEASE = "loop-controller"
# A round in "canary" is unfinished too: no new round starts until the canary is decided.
ACTIVE_STATES = ("pending", "snapshot", "training", "evaluating", "canary")
JOB_ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}
SUBMIT_GRACE_S = 120.0
# Rounds the controller starts on its own are audited under this principal.
CONTROLLER_ACTOR = Actor("system:loop-controller")


RETRY_SUFFIX = "-retry-"


def job_id_for(round_id: str, attempt: int) -> str:
    """The submission id of a round's job: ``illume-round-<id>``, then ``...-retry-<n>``."""
    base = f"illume-round-{round_id}"
    return base if attempt == 0 else f"{base}{RETRY_SUFFIX}{attempt}"


def resubmissions(job_id: str) -> int:
    """How many times the round of ``job_id`` was resubmitted (the n of ``...-retry-<n>``)."""
    head, sep, tail = job_id.rpartition(RETRY_SUFFIX)
    return int(tail) if sep and head and tail.isdigit() else 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def cluster_dashboard_address() -> str:
    """The dashboard (Jobs API) URL the head registered in the GCS of the cluster this process is
    connected to (a Serve replica always is), as Ray's own tools look it up."""
    import ray
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        raise RuntimeError("not connected to a Ray cluster: set tuning.jobs_api_address")
    value = internal_kv._internal_kv_get(
        ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
    )
    if not value:
        raise RuntimeError(
            "the cluster's dashboard registered no address (is it running?): set tuning.jobs_api_address"
        )
    address = value.decode()
    return address if "://" in address else f"http://{address}"


def _job_submission_client(address: str) -> Any:
    # Ray's client adds the cluster token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN or its file) to
    # every request by itself (ray._private.authentication.http_token_authentication).
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


class LoopControllerCore:
    """The controller's logic, independent of Serve (a deployment wraps it; tests drive it).

    ``jobs`` is a fixed Jobs API client (tests); otherwise ``connect(address)`` builds one (Ray's
    ``JobSubmissionClient``) for ``jobs_api_address`` or, when that is empty, for ``resolve()``
    (the dashboard address registered in the cluster's GCS). ``now`` is the clock the round and
    canary timeouts are measured by (tests move it)."""

    def __init__(
        self,
        config: AppConfig,
        holder: str | None = None,
        jobs: Any = None,
        *,
        connect: Callable[[str], Any] | None = None,
        resolve: Callable[[], str] | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self.tuning = config.tuning
        self.store = FeedbackStore(config.feedback_log.store)
        self.registry = AdapterRegistry(self.store)
        self.holder = holder or f"controller-{uuid.uuid4().hex[:8]}"
        self._fixed_jobs = jobs
        self._jobs: Any = None
        self._connect = connect or _job_submission_client
        self._resolve = resolve or cluster_dashboard_address
        self._now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        # Per namespace: why a due round did not start on the last pass (e.g. waiting for evidence).
        self.waiting: dict[str, str] = {}

    def jobs_address(self) -> str:
        """The Jobs API address to use now (configured, else looked up in the cluster)."""
        return self.tuning.jobs_api_address or self._resolve()

    @property
    def jobs(self) -> Any:
        if self._fixed_jobs is not None:
            return self._fixed_jobs
        if self._jobs is None:
            self._jobs = self._connect(self.jobs_address())
        return self._jobs

    def _call_jobs(self, call: Callable[[Any], Any]) -> Any:
        """``call(client)``; after a connection failure the client is rebuilt at a freshly
        resolved address (the head may have moved) and the call tried once more."""
        try:
            return call(self.jobs)
        except OSError as exc:
            # requests' and the builtin ConnectionError are both OSErrors; nothing reached Ray.
            if self._fixed_jobs is not None:
                raise
            log.warning("the Ray Jobs API did not answer (%s); connecting again", exc)
            self._jobs = None
            return call(self.jobs)

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

    def waiting_for_evidence(self, namespace: str) -> str | None:
        """Why a round of ``namespace`` must wait for its held-out split (None: it may start)."""
        gate = self.tuning.gate
        if gate.allow_empty:
            return None
        return waiting_for_evidence(gate, gate_evidence(self.store, namespace, self.tuning.gate_max_items))

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
            # Even a forced round waits for the gate's evidence: without it the gate refuses.
            waiting = self.waiting_for_evidence(namespace)
            if waiting:
                raise FailedPrecondition(waiting)
            record = self.registry.create_round(
                namespace,
                "pending",
                actor=actor or CONTROLLER_ACTOR,
                arguments={"force": force, "accepted": accepted, "new": new},
            )
            self.registry.update_round(
                record.round_id, scores={"trigger": {"accepted": accepted, "new": new}}
            )
            job_id = self._submit_new(namespace, record.round_id)
            return self.registry.update_round(record.round_id, job_id=job_id)

    def _submit(self, namespace: str, round_id: str, attempt: int = 0) -> str:
        """Submit the round's job (attempt 0, or the n-th resubmission); returns its job id."""
        entrypoint = (
            f"{sys.executable} -m services.tuner --namespace {namespace} --round-id {round_id} "
            f"--config-b64 {encode_config(self.config)}"
        )
        return self._call_jobs(
            lambda jobs: jobs.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id_for(round_id, attempt),
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
                entrypoint_num_cpus=self.tuning.entrypoint_num_cpus or None,
                entrypoint_resources=dict(self.tuning.entrypoint_resources) or None,
            )
        )

    def _submit_new(self, namespace: str, round_id: str) -> str:
        try:
            return self._submit(namespace, round_id)
        except Exception as exc:
            self.registry.update_round(round_id, "failed", reason=f"could not submit the job: {exc}"[:300])
            raise FailedPrecondition(
                f"could not submit the round's job: {str(exc).splitlines()[0][:200]}"
            ) from exc

    def _job_status(self, job_id: str) -> str | None:
        """The job's status name, or None when the cluster does not know the job (any more)."""
        try:
            return str(self._call_jobs(lambda jobs: jobs.get_job_status(job_id))).split(".")[-1]
        except Exception as exc:
            if "does not exist" in str(exc) or "not found" in str(exc).lower():
                return None
            raise

    def _resubmit(self, record: RoundRecord, why: str) -> RoundRecord:
        """Submit the round again (same round id, next job id) unless it was resubmitted
        ``max_resubmissions`` times already; then fail it with ``why``."""
        attempt = resubmissions(record.job_id) + 1
        if attempt > self.tuning.max_resubmissions:
            return self.registry.update_round(
                record.round_id,
                "failed",
                reason=f"{why}; resubmitted {attempt - 1} times already (max_resubmissions)",
            )
        try:
            job_id = self._submit(record.namespace, record.round_id, attempt)
        except OSError:
            raise  # the Jobs API is unreachable: try again on the next pass
        except Exception as exc:
            return self.registry.update_round(
                record.round_id, "failed", reason=f"{why}; resubmitting failed: {_first_line(exc)}"
            )
        log.warning("round %s: %s; resubmitted as job %s", record.round_id, why, job_id)
        return self.registry.update_round(record.round_id, job_id=job_id)

    def check_round(self, record: RoundRecord) -> RoundRecord:
        """Watch an unfinished round: re-attach to its running job, resubmit it when its job is
        gone or its driver died, fail it when its job was stopped or it ran too long."""
        if record.state == "canary":
            return self.check_canary(record)
        age = (self._now() - record.started_at).total_seconds()
        if not record.job_id:
            if age > SUBMIT_GRACE_S:
                return self.registry.update_round(
                    record.round_id, "failed", reason="lost before its job started"
                )
            return record
        status = self._job_status(record.job_id)
        if status is None:
            return self._resubmit(record, "its job was lost (cluster restart?)")
        if status in JOB_ENDED:
            fresh = self.registry.get_round(record.round_id)
            if fresh.state in TERMINAL_ROUND_STATES:
                return fresh
            if status == "FAILED":
                # The job body records every failure it sees; FAILED with the round unfinished
                # means its driver process died (its node was lost, it was killed).
                return self._resubmit(fresh, "its job's driver died")
            return self.registry.update_round(record.round_id, "failed", reason=f"its job ended {status}")
        if age > self.tuning.job_timeout_s:
            self._call_jobs(lambda jobs: jobs.stop_job(record.job_id))
            return self.registry.update_round(record.round_id, "failed", reason="job timeout")
        return record  # running (or pending): re-attached, watched on the next pass

    def check_canary(self, record: RoundRecord) -> RoundRecord:
        """Judge a round's canary on the feedback of generations since it started: wait for
        ``min_sample`` judged generations on each side (at most ``max_wait_s``, then
        ``on_timeout``), then move it to production or roll it back (remove the ``canary`` alias,
        mark the version rejected; production is untouched), ending the round with the reason
        and the compared numbers (``scores.canary``)."""
        namespace, version = record.namespace, record.adapter_version
        canary = dict(record.scores.get("canary", {}))
        aliases = self.registry.aliases(namespace)
        if CANARY not in aliases or aliases[CANARY].version != version:
            # An operator moved the canary alias: the round's canary no longer serves.
            promoted = PRODUCTION in aliases and aliases[PRODUCTION].version == version
            return self.registry.update_round(
                record.round_id,
                "promoted" if promoted else "rejected",
                reason=f"canary v{version}: the canary alias was moved by an operator",
            )
        since = parse_rfc3339(canary.get("started_at", "")) or aliases[CANARY].updated_at
        production = aliases[PRODUCTION].version if PRODUCTION in aliases else 0
        arms = tally(self.store.iter_judged(namespace, include_held_out=True, since=since), since)
        decision = decide_canary(
            arms.get(version, ArmStats(version)),
            arms.get(production, ArmStats(production)),
            self.tuning.canary,
            waited_s=(self._now() - since).total_seconds(),
        )
        if decision.action == "wait":
            if decision.reason != canary.get("waiting"):
                log.info("round %s: %s", record.round_id, decision.reason)
                scores = {**record.scores, "canary": {**canary, "waiting": decision.reason}}
                return self.registry.update_round(record.round_id, scores=scores)
            return record
        scores = {**record.scores, "canary": {**canary, **decision.to_dict()}}
        scores["canary"].pop("waiting", None)
        if decision.action == "promote":
            self.registry.set_alias(namespace, PRODUCTION, version, actor=CONTROLLER_ACTOR)
            self.registry.remove_alias(namespace, CANARY, actor=CONTROLLER_ACTOR)
            state = "promoted"
        else:
            self.registry.remove_alias(namespace, CANARY, actor=CONTROLLER_ACTOR)
            self.registry.mark_rejected(namespace, version, decision.reason)
            state = "rejected"
        log.warning("round %s: %s", record.round_id, decision.reason)
        return self.registry.update_round(record.round_id, state, reason=decision.reason, scores=scores)

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
                    self.waiting.pop(namespace, None)
                except FailedPrecondition as exc:
                    if self.waiting.get(namespace) != exc.reason:  # once per change, not every pass
                        log.info("round of %s not started: %s", namespace, exc.reason)
                    self.waiting[namespace] = exc.reason

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
