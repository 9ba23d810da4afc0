"""One local Ray cluster per test session (about 10 s to start), shared by every integration test.

Ray gets more logical CPUs than the machine has cores so that the Serve application's light
deployments and a training worker can all be scheduled (CPU counts in Ray are logical).
"""

from __future__ import annotations

import socket

import pytest

RAY_LOGICAL_CPUS = 8
METRICS_REPORT_INTERVAL_MS = 1000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Ray's metrics export port of the test cluster (Prometheus exposition format)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(metrics_port):
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_LOGICAL_CPUS,
            include_dashboard=False,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
        )
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
