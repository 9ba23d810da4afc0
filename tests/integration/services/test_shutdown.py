"""`illume serve` stopped with calls in flight: they all finish, and the process exits 0.

A real local server runs as a subprocess (its own Ray cluster, the embedded default model, a
temporary data directory, tuning off so that it may share the machine with the test session's
cluster). Six Generate calls are sent at once, SIGTERM follows while they run, and the test watches
what a client sees during the drain (services/local.py, "Stopping"; services/ingress.py,
"Draining"): Serve's health check answers UNAVAILABLE before the last call is answered, a new
call is refused with UNAVAILABLE ("server is shutting down", or the connection is refused once the
server has stopped), every call admitted before SIGTERM gets its answer, and the process exits 0
without a stack trace or an abort.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from illume.client import IllumeClient

from .conftest import png

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
CALLS = 6
TOKENS = 64  # tokens per candidate, exactly: the six calls, one batch each, take 2-5 s here
START_TIMEOUT_S = 150
SIGTERM_AFTER_S = 0.5  # after the calls were sent: long enough for them to be admitted
EXIT_TIMEOUT_S = 60
SHUTTING_DOWN = "server is shutting down"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    data: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def key(self, role: str) -> str:
        return (self.data / "keys" / f"{role}.key").read_text().strip()


@pytest.fixture
def server(tmp_path):
    port, data, log = free_port(), tmp_path / "data", tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "illume.cli", "serve", "--data-dir", str(data), "--grpc-port", str(port)]
    command += ["--num-cpus", "4", "--no-tuning", "--max-batch-size", "1"]
    with log.open("w") as out:
        # Its own session, so that the cleanup below can reach every process of its cluster.
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    served = Server(process, port, data, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "illume ready" not in served.output():
            assert process.poll() is None, f"illume serve exited at start:\n{served.output()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"not ready in {START_TIMEOUT_S} s:\n{served.output()[-3000:]}"
            )
            time.sleep(0.5)
        yield served
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Outcome:
    code: str
    details: str
    at: float  # time.monotonic()


def outcome(call) -> Outcome:
    try:
        call()
        return Outcome("OK", "", time.monotonic())
    except grpc.RpcError as error:
        return Outcome(error.code().name, error.details() or "", time.monotonic())


def healthz(port: int) -> Outcome:
    """Serve's own health check on the gRPC port (what a load balancer probes)."""
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        return outcome(lambda: stub.Healthz(serve_pb2.HealthzRequest(), timeout=2))


@dataclass
class Probes:
    """What a health probe and a new call saw after SIGTERM, every 0.1 s until the server is gone."""

    health: list[Outcome] = field(default_factory=list)
    calls: list[Outcome] = field(default_factory=list)

    def run(self, server: Server, stop: threading.Event) -> None:
        with IllumeClient(f"127.0.0.1:{server.port}", api_key=server.key("client"), retries=0) as c:
            while not stop.is_set():
                self.health.append(healthz(server.port))
                self.calls.append(outcome(lambda: c.server_status(timeout=2)))
                if server.process.poll() is not None:
                    return
                time.sleep(0.1)


def generate(server: Server, seed: int) -> Outcome:
    with IllumeClient(f"127.0.0.1:{server.port}", api_key=server.key("client"), retries=0) as c:
        return outcome(
            lambda: c.generate(
                png(),
                "what colour?",
                n=4,
                max_new_tokens=TOKENS,
                min_new_tokens=TOKENS,
                seed=seed,
                timeout=120,
            )
        )


def test_sigterm_drains_calls_in_flight_and_exits_0(server):
    assert generate(server, seed=1).code == "OK"  # the model answers (and is warm)
    assert healthz(server.port).code == "OK"

    results: dict[int, Outcome] = {}
    callers = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, generate(server, seed=10 + i)))
        for i in range(CALLS)
    ]
    for caller in callers:
        caller.start()
    time.sleep(SIGTERM_AFTER_S)
    sigterm = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    probes, stop_probing = Probes(), threading.Event()
    prober = threading.Thread(target=probes.run, args=(server, stop_probing))
    prober.start()
    for caller in callers:
        caller.join(timeout=120)
    try:
        exit_code = server.process.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        stop_probing.set()
        prober.join()
    exited = time.monotonic()

    output = server.output()
    last_done = max(r.at for r in results.values())
    not_serving = next((h.at for h in probes.health if h.code == "UNAVAILABLE"), None)
    print(
        f"timeline after SIGTERM: health NOT_SERVING {_s(not_serving, sigterm)}, "
        f"last call in flight answered {_s(last_done, sigterm)}, exit {_s(exited, sigterm)}; "
        f"calls: {[(r.code, round(r.at - sigterm, 2)) for _, r in sorted(results.items())]}"
    )
    # Every call sent before SIGTERM gets its answer, and some were still running at SIGTERM.
    failed = {i: f"{r.code}: {r.details}" for i, r in results.items() if r.code != "OK"}
    assert not failed, f"calls in flight failed: {failed}\n{output[-3000:]}"
    assert sum(r.at > sigterm for r in results.values()) >= 2, "SIGTERM came after the calls; nothing drained"
    # Health says NOT_SERVING before the calls in flight are done, and new calls are refused.
    assert not_serving is not None and not_serving < last_done, probes.health
    refused = [c for c in probes.calls if c.code != "OK"]
    assert refused and all(c.code == "UNAVAILABLE" for c in refused), probes.calls
    assert any(c.details == SHUTTING_DOWN for c in refused), probes.calls
    # A clean exit.
    assert exit_code == 0, output[-3000:]
    for sign in ("Traceback", "Aborted", "SIGTERM received", "Check failed"):
        assert sign not in output, f"{sign!r} in the output of illume serve:\n{output[-3000:]}"
    assert re.search(r"illume: drained in [\d.]+ s, no call in flight", output), output[-3000:]


def _s(at: float | None, since: float) -> str:
    return "never" if at is None else f"+{at - since:.2f} s"
