"""`illume serve` on one machine: rounds reach this cluster's Jobs API; a taken port is refused."""

from __future__ import annotations

import socket
import threading

import pytest

from services.local import ensure_port_free, local_config, wait_until_port_free, with_local_jobs_api


def test_rounds_go_to_the_dashboard_of_the_cluster_started_here(tmp_path):
    config = local_config(tmp_path, tmp_path, None)
    moved = with_local_jobs_api(config, "127.0.0.1:8266")
    assert moved.tuning.jobs_api_address == "http://127.0.0.1:8266"
    assert with_local_jobs_api(config, None).tuning.jobs_api_address == config.tuning.jobs_api_address
    chosen = config.model_copy(
        update={"tuning": config.tuning.model_copy(update={"jobs_api_address": "http://head:8265"})}
    )
    assert with_local_jobs_api(chosen, "127.0.0.1:8266").tuning.jobs_api_address == "http://head:8265"


def test_a_port_another_server_listens_on_is_refused_even_with_reuseport():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # gRPC servers listen with SO_REUSEPORT; a second one could bind the same port beside it.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(RuntimeError, match=f"port {port} is in use"):
            ensure_port_free(port)
    finally:
        listener.close()
    ensure_port_free(port)


def _listener() -> tuple[socket.socket, int]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener, listener.getsockname()[1]


def test_a_port_still_held_after_the_wait_is_refused_with_its_name():
    listener, port = _listener()
    try:
        with pytest.raises(RuntimeError, match=f"agent port {port} is in use"):
            wait_until_port_free(port, "agent port", timeout_s=0.3, poll_s=0.05)
    finally:
        listener.close()


def test_a_port_released_during_the_wait_is_accepted():
    # A cluster stopped just before `illume serve` starts releases its agent port a little later.
    listener, port = _listener()
    threading.Timer(0.3, listener.close).start()
    wait_until_port_free(port, "agent port", timeout_s=5.0, poll_s=0.05)


def test_the_embedded_model_gets_a_replay_pool_and_a_model_of_ones_own_does_not(tmp_path):
    embedded = local_config(tmp_path, None, None)
    assert embedded.tuning.replay_data == str(tmp_path.resolve() / "replay" / "train.json")
    assert (tmp_path / "replay" / "train.json").is_file()
    assert local_config(tmp_path, tmp_path, None).tuning.replay_data is None


def test_the_embedded_model_trains_each_epoch_on_answer_rows_of_its_own(tmp_path):
    embedded = local_config(tmp_path, None, None).tuning
    assert embedded.snapshot.replay_passes == embedded.train.epochs == 5
    assert local_config(tmp_path, tmp_path, None).tuning.snapshot.replay_passes == 1


def test_the_embedded_model_is_gated_on_a_gold_world_no_round_trains_on(tmp_path):
    from illume.data import load_vqax

    gate = local_config(tmp_path, None, None).tuning.gate
    world = gate.curated["world"]
    assert world.metrics == ("acceptance/fact", "answer_accuracy") and world.critics == ("fact",)
    assert [world.tolerance_for(m) for m in world.metrics] == [3.5, 3.0]
    items = load_vqax(world.path)
    assert len(items) == world.limit == world.min_items == 500
    assert all(item.explanations and item.extra.get("scene") for item in items)
    # Not the replay pool's world: its questions are images no round trains on.
    replay = load_vqax(tmp_path / "replay" / "train.json")
    assert not {i.image_path.read_bytes() for i in items[:20]} & {i.image_path.read_bytes() for i in replay}
    assert local_config(tmp_path, tmp_path, None).tuning.gate.curated == {}


def test_a_gate_world_of_another_size_from_an_earlier_release_is_built_again(tmp_path):
    from illume.data import load_vqax
    from illume.world import build_world

    # A data dir whose gate world has the 200 items of an earlier release: the gate's min_items
    # would refuse every round, so the config build makes the world again at today's size.
    build_world(tmp_path / "gate-world", {"train": 0, "val": 200, "test": 0}, seed=13)
    world = local_config(tmp_path, None, None).tuning.gate.curated["world"]
    assert len(load_vqax(world.path)) == world.min_items == 500
    # A file cut short (a build interrupted) is built again too, the same 500 items.
    first = world.path.read_bytes()
    world.path.write_bytes(first[: len(first) // 2])
    local_config(tmp_path, None, None)
    assert world.path.read_bytes() == first
