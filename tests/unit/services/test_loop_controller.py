"""LoopControllerCore with a fake Ray Jobs API: where it submits, and what a restart finds.

After a restart the controller finds the unfinished round in the store and asks the Jobs API
about its job: a running job is re-attached (watched, never failed or resubmitted); a job the
cluster no longer knows (a cluster restart) or whose driver died is resubmitted under the same
round id, at most ``max_resubmissions`` times; a stopped job fails the round.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from illume.evaluation.gate import GateConfig
from illume.models.loading import ModelSettings
from illume.store import AdapterRegistry
from illume.store.settings import StoreSettings
from services.config import AppConfig, FeedbackLogSettings, GeneratorSettings, TuningSettings
from services.loop_controller import LoopControllerCore, job_id_for, resubmissions


class FakeJobs:
    """The part of Ray's JobSubmissionClient the controller uses; statuses by job id."""

    def __init__(self, address: str = "", statuses: dict[str, str] | None = None) -> None:
        self.address = address
        self.statuses = statuses if statuses is not None else {}
        self.submitted: list[dict] = []
        self.stopped: list[str] = []
        self.down = False

    def submit_job(self, **kwargs) -> str:
        if self.down:
            raise ConnectionError(f"Failed to connect to Ray at address: {self.address}")
        self.submitted.append(kwargs)
        self.statuses[kwargs["submission_id"]] = "PENDING"
        return kwargs["submission_id"]

    def get_job_status(self, job_id: str) -> str:
        if self.down:
            raise ConnectionError(f"Failed to connect to Ray at address: {self.address}")
        if job_id not in self.statuses:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return f"JobStatus.{self.statuses[job_id]}"

    def stop_job(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        self.statuses[job_id] = "STOPPED"
        return True


def _config(tmp_path: Path, **tuning) -> AppConfig:
    # These tests are about jobs, not evidence: the gate skips its (empty) held-out set.
    tuning.setdefault("gate", GateConfig(allow_empty=True))
    return AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=tmp_path / "model")),
        feedback_log=FeedbackLogSettings(store=StoreSettings(url=f"sqlite:///{tmp_path / 'f.db'}")),
        tuning=TuningSettings(min_new_judgements=1, **tuning),
    )


@pytest.fixture
def jobs() -> FakeJobs:
    return FakeJobs("http://head:8265")


def _core(tmp_path, jobs, **tuning) -> LoopControllerCore:
    return LoopControllerCore(_config(tmp_path, **tuning), holder="test", jobs=jobs)


def _round_with_job(core: LoopControllerCore, state: str = "training", job_id: str = ""):
    record = core.registry.create_round("default", "pending")
    return core.registry.update_round(record.round_id, state, job_id=job_id or job_id_for(record.round_id, 0))


# --- where rounds are submitted --------------------------------------------------------------


def test_an_empty_address_is_resolved_from_the_cluster_and_again_after_a_connection_failure(tmp_path):
    addresses = iter(["http://10.0.0.5:8265", "http://10.0.0.9:8265"])
    clients: list[FakeJobs] = []
    statuses: dict[str, str] = {}  # one cluster behind every client

    def connect(address: str) -> FakeJobs:
        clients.append(FakeJobs(address, statuses))
        return clients[-1]

    core = LoopControllerCore(
        _config(tmp_path), holder="test", connect=connect, resolve=lambda: next(addresses)
    )
    assert core.tuning.jobs_api_address == ""  # the default: never a loopback guess
    record = core.start_round("default", force=True)
    assert [c.address for c in clients] == ["http://10.0.0.5:8265"]
    clients[0].down = True  # the head came back elsewhere; the GCS has its new address
    statuses[record.job_id] = "RUNNING"
    assert core.check_round(record).state == "pending"  # watched through the new client
    assert [c.address for c in clients] == ["http://10.0.0.5:8265", "http://10.0.0.9:8265"]


def test_a_configured_address_is_used_as_is(tmp_path):
    seen: list[str] = []

    def connect(address: str) -> FakeJobs:
        seen.append(address)
        return FakeJobs(address)

    def resolve() -> str:
        raise AssertionError("a configured address is never looked up")

    core = LoopControllerCore(
        _config(tmp_path, jobs_api_address="http://illume-head-svc:8265"),
        holder="test",
        connect=connect,
        resolve=resolve,
    )
    core.start_round("default", force=True)
    assert seen == ["http://illume-head-svc:8265"]


def test_the_job_asks_for_the_entrypoint_resources(tmp_path, jobs):
    core = _core(tmp_path, jobs, entrypoint_resources={"illume-train": 0.01}, entrypoint_num_cpus=0.5)
    record = core.start_round("default", force=True)
    (job,) = jobs.submitted
    assert job["submission_id"] == record.job_id == f"illume-round-{record.round_id}"
    assert job["entrypoint_resources"] == {"illume-train": 0.01}
    assert job["entrypoint_num_cpus"] == 0.5
    assert f"--round-id {record.round_id}" in job["entrypoint"]


# --- after a restart -------------------------------------------------------------------------


def test_a_round_whose_job_still_runs_is_reattached_not_failed_or_resubmitted(tmp_path, jobs):
    core = _core(tmp_path, jobs)
    record = _round_with_job(core)
    jobs.statuses[record.job_id] = "RUNNING"
    restarted = _core(tmp_path, jobs)  # a new controller replica, same store
    for _ in range(3):
        restarted.tick()
    again = restarted.registry.get_round(record.round_id)
    assert (again.state, again.job_id) == ("training", record.job_id)
    assert jobs.submitted == [] and jobs.stopped == []


def test_a_round_whose_job_is_gone_is_resubmitted_under_the_same_round_id(tmp_path, jobs):
    core = _core(tmp_path, jobs)
    record = _round_with_job(core)  # its job is unknown to the (restarted) cluster
    after = core.check_round(record)
    assert after.round_id == record.round_id and after.state == "training"
    assert after.job_id == f"illume-round-{record.round_id}-retry-1"
    (job,) = jobs.submitted
    assert job["submission_id"] == after.job_id and f"--round-id {record.round_id}" in job["entrypoint"]
    # Only one round exists: the resubmission is the same round, not a new one.
    rounds, _ = AdapterRegistry(core.store).list_rounds("default")
    assert [r.round_id for r in rounds] == [record.round_id]


def test_a_round_whose_driver_died_is_resubmitted_but_a_stopped_one_fails(tmp_path, jobs):
    core = _core(tmp_path, jobs)
    died = _round_with_job(core)
    jobs.statuses[died.job_id] = "FAILED"
    assert core.check_round(died).job_id.endswith("-retry-1")
    core.registry.update_round(died.round_id, "failed", reason="test cleanup")
    other = _round_with_job(core)
    jobs.statuses[other.job_id] = "STOPPED"
    after = core.check_round(other)
    assert (after.state, after.reason) == ("failed", "its job ended STOPPED")
    assert len(jobs.submitted) == 1


def test_a_job_that_finished_its_round_is_left_alone(tmp_path, jobs):
    core = _core(tmp_path, jobs)
    record = _round_with_job(core)
    jobs.statuses[record.job_id] = "FAILED"  # the job failed after recording the round's end
    core.registry.update_round(record.round_id, "failed", reason="training failed: boom")
    assert core.check_round(record).reason == "training failed: boom"
    assert jobs.submitted == []


def test_resubmissions_are_bounded_and_then_the_round_fails_with_the_reason(tmp_path, jobs):
    core = _core(tmp_path, jobs, max_resubmissions=2)
    record = _round_with_job(core)
    for attempt in (1, 2):
        record = core.check_round(record)
        assert resubmissions(record.job_id) == attempt
        del jobs.statuses[record.job_id]  # lost again
    final = core.check_round(record)
    assert final.state == "failed"
    assert final.reason == (
        "its job was lost (cluster restart?); resubmitted 2 times already (max_resubmissions)"
    )
    assert len(jobs.submitted) == 2


def test_no_resubmission_when_max_resubmissions_is_zero(tmp_path, jobs):
    core = _core(tmp_path, jobs, max_resubmissions=0)
    final = core.check_round(_round_with_job(core))
    assert final.state == "failed" and "max_resubmissions" in final.reason
    assert jobs.submitted == []


def test_an_unreachable_jobs_api_fails_nothing(tmp_path, jobs):
    core = _core(tmp_path, jobs)
    record = _round_with_job(core)
    jobs.down = True
    with pytest.raises(ConnectionError):
        core.check_round(record)
    assert core.registry.get_round(record.round_id).state == "training"


def test_job_ids_count_resubmissions():
    assert resubmissions(job_id_for("r-1", 0)) == 0
    assert resubmissions(job_id_for("r-1", 3)) == 3
    assert job_id_for("abc", 2) == "illume-round-abc-retry-2"
