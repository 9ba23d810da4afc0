"""`illume serve` on one machine: rounds reach this cluster's Jobs API; a taken port is refused."""

from __future__ import annotations

import socket

import pytest

from services.local import ensure_port_free, local_config, with_local_jobs_api


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
