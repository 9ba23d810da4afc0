"""A round hands its training state over after every epoch and resumes from it to the same adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from illume.training import SnapshotConfig, TrainConfig, build_snapshot, train_round
from tests.unit.training.conftest import judged_from

# Dropout, a decaying rate and two replay passes: a resume that missed the RNG, the scheduler or
# a loader's shuffling state would end on another adapter.
CONFIG = TrainConfig(
    learning_rate=0.1, lora_alpha=32, epochs=3, batch_size=4, lora_dropout=0.1, lr_schedule="linear", seed=0
)
STATE_FILES = {"training_state.json", "trainable.safetensors", "optimizer.pt", "rng.pt"}


class Interrupted(Exception):
    """Stands for a worker lost after a checkpoint."""


@pytest.fixture(scope="module")
def two_pass_snapshot(tiny_world):
    """9 rows per epoch (3 rationale, 6 answer), the answer rows alternating between two passes."""
    return build_snapshot(
        judged_from(tiny_world["train"], 3), SnapshotConfig(replay_ratio=2, replay_passes=2, seed=0)
    )


class Recorder:
    """A checkpoint callback that keeps a copy of every state and what it saw during the call."""

    def __init__(self, root: Path, *, interrupt_after: int | None = None) -> None:
        self.root = root
        self.interrupt_after = interrupt_after
        self.calls: list[tuple[int, dict, Path | None]] = []
        self.files: list[set[str]] = []
        self.events: list[tuple[str, int]] = []

    def reporter(self, epoch: int, metrics: dict) -> None:
        self.events.append(("report", epoch))

    def __call__(self, epoch: int, metrics: dict, state_dir: Path | None) -> None:
        self.events.append(("checkpoint", epoch))
        self.calls.append((epoch, metrics, state_dir))
        assert state_dir is not None
        self.files.append({p.name for p in state_dir.iterdir()})
        shutil.copytree(state_dir, self.copy(epoch))
        if epoch == self.interrupt_after:
            raise Interrupted

    def copy(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch}"


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, two_pass_snapshot, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    recorder = Recorder(root / "states")
    result = train_round(
        two_pass_snapshot,
        CONFIG,
        recorder.reporter,
        model_dir=tiny_model,
        out_dir=root / "adapter",
        checkpoint=recorder,
    )
    return result, recorder


@pytest.fixture(scope="module")
def resumed(tiny_model, two_pass_snapshot, tmp_path_factory):
    """A round lost after its first epoch's checkpoint, then resumed from that state."""
    root = tmp_path_factory.mktemp("resumed")
    lost = Recorder(root / "lost", interrupt_after=1)
    with pytest.raises(Interrupted):
        train_round(two_pass_snapshot, CONFIG, model_dir=tiny_model, out_dir=root / "never", checkpoint=lost)
    assert not lost.calls[0][2].exists()  # deleted although the callback raised
    again = Recorder(root / "again")
    result = train_round(
        two_pass_snapshot,
        CONFIG,
        again.reporter,
        model_dir=tiny_model,
        out_dir=root / "adapter",
        checkpoint=again,
        resume_from=lost.copy(1),
    )
    return result, again, lost


def test_a_resumed_round_ends_on_the_uninterrupted_adapter(uninterrupted, resumed):
    full, _ = uninterrupted
    result, again, lost = resumed
    _assert_same_tensors(_tensors(result.adapter_dir), _tensors(full.adapter_dir))
    assert result.adapter_sha256 == full.adapter_sha256
    # It trains epochs 2 and 3 only, and reports the first from the state.
    assert [e for kind, e in again.events if kind == "report"] == [2, 3]
    assert result.steps == full.steps == 9
    assert result.epochs[0] == lost.calls[0][1]
    for key in ("loss", "rationale_loss", "answer_loss", "rows", "steps", "learning_rate"):
        assert [m[key] for m in result.epochs] == [m[key] for m in full.epochs], key


def test_the_optimizer_and_the_schedule_continue_where_they_were(uninterrupted, resumed):
    _, full = uninterrupted
    _, again, _ = resumed
    saved = torch.load(full.copy(2) / "optimizer.pt", weights_only=True)
    after_resume = torch.load(again.copy(2) / "optimizer.pt", weights_only=True)
    moments = saved["optimizer"]["state"]
    assert moments and all(float(s["step"]) == 6 for s in moments.values())  # 2 epochs of 3 batches
    assert moments.keys() == after_resume["optimizer"]["state"].keys()
    for index, state in moments.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], after_resume["optimizer"]["state"][index][key]), (index, key)
    assert saved["scheduler"]["last_epoch"] == after_resume["scheduler"]["last_epoch"] == 6


def test_checkpoint_gets_each_epochs_state_in_a_directory_deleted_after_the_call(uninterrupted):
    result, recorder = uninterrupted
    assert [epoch for epoch, _, _ in recorder.calls] == [1, 2, 3]
    assert recorder.events == [(kind, e) for e in (1, 2, 3) for kind in ("report", "checkpoint")]
    assert all(files == STATE_FILES for files in recorder.files)  # complete when the callback sees it
    assert len({state_dir for _, _, state_dir in recorder.calls}) == 3
    assert not any(state_dir.exists() for _, _, state_dir in recorder.calls)
    assert [metrics for _, metrics, _ in recorder.calls] == result.epochs
    state = json.loads((recorder.copy(3) / "training_state.json").read_text())
    assert (state["epoch"], state["steps"], state["world_size"], state["format"]) == (3, 9, 1, 1)
    assert state["epochs"] == result.epochs
    # The state's trainable tensors are the adapter's (peft names them without the adapter name).
    trainable = load_file(recorder.copy(3) / "trainable.safetensors")
    adapter = _tensors(result.adapter_dir)
    assert len(trainable) == len(adapter)
    for name, value in trainable.items():
        assert torch.equal(value, adapter[name.replace(".default", "")]), name


def test_a_state_of_another_snapshot_config_or_world_size_is_refused(
    uninterrupted, tiny_model, two_pass_snapshot, small_snapshot, tmp_path
):
    _, recorder = uninterrupted
    state = recorder.copy(1)

    def resume(snapshot=two_pass_snapshot, config=CONFIG, resume_from=state):
        train_round(snapshot, config, model_dir=tiny_model, out_dir=tmp_path / "x", resume_from=resume_from)

    with pytest.raises(
        ValueError, match=f"snapshot {two_pass_snapshot.sha256}, not of {small_snapshot.sha256}"
    ):
        resume(snapshot=small_snapshot)
    with pytest.raises(ValueError, match=r"another TrainConfig \(learning_rate, seed differ\)"):
        resume(config=CONFIG.model_copy(update={"learning_rate": 0.2, "seed": 1}))
    with pytest.raises(ValueError, match="holds no training state"):
        resume(resume_from=tmp_path)
    for field, value, message in (
        ("world_size", 2, "written by 2 workers, not 1"),
        ("format", 99, "format 99"),
    ):
        edited = tmp_path / field
        shutil.copytree(state, edited)
        data = json.loads((edited / "training_state.json").read_text())
        (edited / "training_state.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(ValueError, match=message):
            resume(resume_from=edited)
    assert not (tmp_path / "x").exists()


def test_a_state_at_max_steps_resumes_to_its_adapter_without_training(tiny_model, small_snapshot, tmp_path):
    config = CONFIG.model_copy(update={"max_steps": 4})  # epoch 1: 3 steps; epoch 2 stops after 1
    recorder = Recorder(tmp_path / "states")
    full = train_round(
        small_snapshot, config, model_dir=tiny_model, out_dir=tmp_path / "full", checkpoint=recorder
    )
    assert [(e, m["steps"]) for e, m, _ in recorder.calls] == [(1, 3), (2, 4)]
    after = Recorder(tmp_path / "after")
    done = train_round(
        small_snapshot,
        config,
        after.reporter,
        model_dir=tiny_model,
        out_dir=tmp_path / "done",
        checkpoint=after,
        resume_from=recorder.copy(2),
    )
    assert after.events == [] and done.steps == 4 and done.epochs == full.epochs
    _assert_same_tensors(_tensors(done.adapter_dir), _tensors(full.adapter_dir))
    one_step = train_round(
        small_snapshot, config, model_dir=tiny_model, out_dir=tmp_path / "step", resume_from=recorder.copy(1)
    )
    assert one_step.steps == 4 and len(one_step.epochs) == 2
    _assert_same_tensors(_tensors(one_step.adapter_dir), _tensors(full.adapter_dir))


def _distributed_loader(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """What ray.train.torch.prepare_data_loader does on CPU: the same loader over a DistributedSampler."""
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=torch.utils.data.DistributedSampler(loader.dataset, shuffle=True),
        collate_fn=loader.collate_fn,
        generator=loader.generator,
    )


def _data_parallel_worker(
    rank: int, world_size: int, init: str, model_dir: Path, snapshot, root: Path
) -> None:
    """One of two gloo ranks: an uninterrupted round, then one resumed from its first epoch's state."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        states: list[Path | None] = []

        def keep(epoch: int, metrics: dict, state_dir: Path | None) -> None:
            states.append(state_dir)
            if state_dir is not None and epoch == 1:
                shutil.copytree(state_dir, root / "epoch-1")

        hooks = {
            "prepare_model": torch.nn.parallel.DistributedDataParallel,
            "prepare_loader": _distributed_loader,
        }
        config = CONFIG.model_copy(update={"epochs": 2})
        train_round(snapshot, config, model_dir=model_dir, out_dir=root / "full", checkpoint=keep, **hooks)
        assert len(states) == 2 and all((s is None) == (rank != 0) for s in states)
        dist.barrier()
        train_round(
            snapshot,
            config,
            model_dir=model_dir,
            out_dir=root / "resumed",
            resume_from=root / "epoch-1",
            **hooks,
        )
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_resume_to_the_uninterrupted_adapter(tiny_model, small_snapshot, tmp_path):
    """Two gloo ranks with DDP and a distributed sampler, as Ray Train runs the round."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_data_parallel_worker, args=(2, init, tiny_model, small_snapshot, tmp_path), nprocs=2)
    state = json.loads((tmp_path / "epoch-1" / "training_state.json").read_text())
    assert state["world_size"] == 2 and state["steps"] == 2  # 9 rows: 5 per rank, batches of 4
    assert len(torch.load(tmp_path / "epoch-1" / "rng.pt", weights_only=True)) == 2  # one per rank
    _assert_same_tensors(_tensors(tmp_path / "resumed"), _tensors(tmp_path / "full"))
