"""Shared test settings and the one local Ray cluster of a test session.

Every test process reads no model hub. Tiers that need Ray share one local cluster (about 10 s to
start) with the dashboard on (the Ray Jobs API serves tuning rounds) and Serve's gRPC proxy on a
free port. Ray gets more logical CPUs than the machine has cores so the Serve application's light
deployments and a training worker can all be scheduled (CPU counts in Ray are logical).
"""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
def dashboard_port() -> int:
    """The test cluster's dashboard, which serves the Ray Jobs API."""
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(metrics_port, dashboard_port):
    import ray

    from services.local import local_only_ray, local_runtime_env, ray_agent_port, wait_until_port_free

    if not ray.is_initialized():
        try:
            wait_until_port_free(ray_agent_port(), "Ray's dashboard agent port", timeout_s=30)
        except RuntimeError as error:
            # Without its agent the test cluster's Jobs API refuses every job (rounds fail).
            pytest.fail(f"{error}: stop the other local Ray cluster (an `illume serve`?) first")
        # Bound as `illume serve` binds: Ray's ports and Serve's gRPC proxy on loopback only
        # (tests/integration/services/test_local_binding.py checks it).
        local_only_ray()
        ray.init(
            num_cpus=RAY_LOGICAL_CPUS,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
            log_to_driver=False,
            configure_logging=False,
            runtime_env=local_runtime_env(),
        )
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_ports(ray_cluster) -> tuple[int, int]:
    """Serve started once with its gRPC proxy (the illume servicers) and its HTTP proxy (the web
    app) on free loopback ports: (gRPC, HTTP)."""
    from ray import serve

    from services.local import grpc_options

    grpc, http = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http}, grpc_options=grpc_options(grpc))
    return grpc, http


@pytest.fixture(scope="session")
def grpc_port(serve_ports) -> int:
    return serve_ports[0]


@pytest.fixture(scope="session")
def http_port(serve_ports) -> int:
    return serve_ports[1]
