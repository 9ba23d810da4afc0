"""IllumeClient's deadlines and retries against a real gRPC server on 127.0.0.1.

The server fails the first attempts of a call as a script says (status code, after a delay) and
records, for every attempt, when it arrived, the gRPC deadline left (``time_remaining()``) and the
``illume-timeout-ms`` metadata the client sent.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from illume.client import MIN_ATTEMPT_S, IllumeClient
from illume.v1 import illume_pb2 as pb
from illume.v1 import illume_pb2_grpc as pb_grpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SLACK_S = 0.03  # scheduling and transport between the client's clock reading and the server's
MARGIN_S = 0.1  # how far past its deadline a call may return (the old loop overshot by 0.25 s)


@dataclass
class Attempt:
    arrived: float  # time.monotonic() on arrival (same clock as the test's)
    time_remaining: float  # the gRPC deadline the server sees
    timeout_ms: int  # the illume-timeout-ms metadata


@dataclass
class Script:
    failures: list[tuple[grpc.StatusCode, float]] = field(default_factory=list)  # (code, delay_s)
    attempts: list[Attempt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, context: grpc.ServicerContext) -> None:
        """Record an attempt; abort it with the next scripted failure, if any is left."""
        arrived = time.monotonic()
        metadata = dict(context.invocation_metadata())
        with self.lock:
            timeout_ms = int(metadata["illume-timeout-ms"])
            self.attempts.append(Attempt(arrived, context.time_remaining(), timeout_ms))
            failure = self.failures.pop(0) if self.failures else None
        if failure:
            code, delay = failure
            time.sleep(delay)
            context.abort(code, "scripted failure")


class Admin(pb_grpc.AdminServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def GetServerStatus(self, request, context):
        self.script.attempt(context)
        return pb.ServerStatus()


class Rationale(pb_grpc.RationaleServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.fail_after_first: grpc.StatusCode | None = None

    def GenerateStream(self, request, context):
        self.script.attempt(context)
        yield pb.GenerateStreamResponse(header=pb.GenerateResponse(answer="a"))
        if self.fail_after_first is not None:
            context.abort(self.fail_after_first, "scripted failure mid-stream")
        for _ in range(2):
            yield pb.GenerateStreamResponse(candidate=pb.Candidate())


@pytest.fixture(scope="module")
def server():
    script = Script()
    rationale = Rationale(script)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AdminServiceServicer_to_server(Admin(script), grpc_server)
    pb_grpc.add_RationaleServiceServicer_to_server(rationale, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield port, script, rationale
    grpc_server.stop(None)


@pytest.fixture
def connect(server):
    """``connect(failures, **client_kwargs) -> (client, script)`` on a connected channel."""
    port, script, rationale = server
    clients = []

    def make(failures=(), **kwargs):
        script.failures.clear()
        rationale.fail_after_first = None
        client = IllumeClient(f"127.0.0.1:{port}", **kwargs)
        clients.append(client)
        client.server_status(timeout=5)  # connect now, so that setup does not count in the timings
        script.attempts.clear()
        script.failures[:] = list(failures)
        return client, script

    yield make
    for client in clients:
        client.close()


def unavailable(k: int, delay_s: float = 0.0) -> list[tuple[grpc.StatusCode, float]]:
    return [(UNAVAILABLE, delay_s)] * k


def assert_attempts_advertise_time_left(attempts: list[Attempt], started: float, timeout: float) -> None:
    """Every attempt arrived before the deadline and told the server the time really left then."""
    deadline = started + timeout
    for attempt in attempts:
        left = deadline - attempt.arrived
        assert left >= MIN_ATTEMPT_S - SLACK_S, f"an attempt started {-left:.3f}s past the deadline"
        assert abs(attempt.timeout_ms / 1000 - left) <= SLACK_S, (attempt, left)
        assert abs(attempt.time_remaining - attempt.timeout_ms / 1000) <= SLACK_S, attempt
    advertised = [a.timeout_ms for a in attempts]
    assert advertised == sorted(advertised, reverse=True) and len(set(advertised)) == len(advertised)


def test_each_retry_advertises_the_time_really_left(connect):
    client, script = connect(unavailable(3, delay_s=0.05), retries=3, backoff_s=0.05)
    started = time.monotonic()
    client.server_status(timeout=2.0)
    assert len(script.attempts) == 4
    assert_attempts_advertise_time_left(script.attempts, started, 2.0)
    # the last attempt was told about what was left after three 50 ms failures and 350 ms of pauses
    assert script.attempts[-1].timeout_ms <= 2000 - 500


def test_backoff_doubles(connect):
    client, script = connect(unavailable(3), retries=3, backoff_s=0.04)
    client.server_status(timeout=5.0)
    arrivals = [a.arrived for a in script.attempts]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) == 3
    for gap, pause in zip(gaps, [0.04, 0.08, 0.16], strict=True):
        assert pause <= gap <= pause + SLACK_S, gaps
    assert gaps[0] < gaps[1] < gaps[2]


@pytest.mark.parametrize(
    ("delay_s", "timeout", "backoff_s"),
    [
        (0.3, 0.5, 0.45),  # the pause after the first failure would end 0.25 s past the deadline
        (0.15, 0.5, 0.1),  # the second pause would
        (0.1, 0.45, 0.1),  # the second pause would end 50 ms past the deadline
    ],
)
def test_retries_stop_within_the_callers_deadline(connect, delay_s, timeout, backoff_s):
    client, script = connect(unavailable(5, delay_s), retries=5, backoff_s=backoff_s)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        client.server_status(timeout=timeout)
    elapsed = time.monotonic() - started
    assert_attempts_advertise_time_left(script.attempts, started, timeout)
    assert elapsed <= timeout + MARGIN_S, f"the call took {elapsed:.3f}s with a {timeout}s deadline"
    assert raised.value.code() == UNAVAILABLE  # the real cause, not a deadline of a hopeless attempt


def test_retries_are_bounded(connect):
    client, script = connect(unavailable(5), retries=2, backoff_s=0.01)
    with pytest.raises(grpc.RpcError) as raised:
        client.server_status(timeout=5.0)
    assert raised.value.code() == UNAVAILABLE
    assert len(script.attempts) == 3


def test_a_slow_attempt_ends_at_the_deadline(connect):
    client, script = connect(unavailable(1, delay_s=1.0), retries=3, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        client.server_status(timeout=0.3)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started <= 0.3 + MARGIN_S
    assert len(script.attempts) == 1


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
def test_other_codes_are_not_retried(connect, code):
    client, script = connect([(code, 0.0)], retries=3, backoff_s=0.01)
    with pytest.raises(grpc.RpcError) as raised:
        client.server_status(timeout=5.0)
    assert raised.value.code() == code
    assert len(script.attempts) == 1


def test_a_stream_is_retried_until_its_first_message(connect):
    client, script = connect(unavailable(2, delay_s=0.05), retries=3, backoff_s=0.05)
    started = time.monotonic()
    replies = list(client.generate_stream(b"png", "q?", timeout=2.0))
    assert [r.WhichOneof("item") for r in replies] == ["header", "candidate", "candidate"]
    assert len(script.attempts) == 3
    assert_attempts_advertise_time_left(script.attempts, started, 2.0)


def test_a_stream_is_not_retried_after_a_message(connect, server):
    client, script = connect(retries=3, backoff_s=0.01)
    server[2].fail_after_first = UNAVAILABLE
    stream = client.generate_stream(b"png", "q?", timeout=2.0)
    assert next(stream).WhichOneof("item") == "header"
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() == UNAVAILABLE
    assert len(script.attempts) == 1


def test_a_stream_stops_retrying_within_the_deadline(connect):
    client, script = connect(unavailable(5, delay_s=0.3), retries=5, backoff_s=0.45)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(client.generate_stream(b"png", "q?", timeout=0.5))
    assert time.monotonic() - started <= 0.5 + MARGIN_S
    assert raised.value.code() == UNAVAILABLE
    assert_attempts_advertise_time_left(script.attempts, started, 0.5)
