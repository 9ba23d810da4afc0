"""Draining, piece by piece: a draining Ingress refuses every new call before reading its key; the
replica's graceful stop starts the drain; `illume serve` takes SIGTERM and Ctrl-C as stop requests
and keeps them from Ray. tests/integration/services/test_shutdown.py runs the whole of it."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

import services.local as local
from illume.errors import Unavailable
from services import metrics
from services.servicers.base import (
    SHUTTING_DOWN_REASON,
    Drain,
    ServicerBase,
    StreamAborted,
    rpc,
    rpc_stream,
)


class _Context:
    def __init__(self) -> None:
        self.code, self.details = None, None

    def invocation_metadata(self):
        raise AssertionError("a draining replica read the call's key")

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details) -> None:
        self.details = details


class _Servicer(ServicerBase):
    def __init__(self) -> None:
        self.drain = Drain()
        self.ran = False

    @rpc("client", response=lambda: "empty reply")
    async def Unary(self, request, grpc_context, caller):
        self.ran = True
        return "reply"

    @rpc_stream("client")
    async def Stream(self, request, grpc_context, caller):
        self.ran = True
        yield "item"


@pytest.fixture(autouse=True)
def no_ray_metrics(monkeypatch):
    monkeypatch.setattr(metrics, "record_request", lambda *a: None)


def test_drain_refuses_only_after_it_began():
    drain = Drain()
    drain.admit()
    assert not drain.draining
    drain.begin("test")
    first = drain.since
    drain.begin("again")
    assert drain.draining and drain.since == first
    with pytest.raises(Unavailable) as refused:
        drain.admit()
    assert refused.value.code == "UNAVAILABLE" and refused.value.reason == SHUTTING_DOWN_REASON


def test_a_draining_ingress_refuses_new_calls_with_unavailable():
    servicer, context = _Servicer(), _Context()
    servicer.drain.begin("test")
    assert asyncio.run(servicer.Unary(object(), context)) == "empty reply"
    assert (context.code, context.details) == (grpc.StatusCode.UNAVAILABLE, "server is shutting down")

    async def consume(context):
        return [item async for item in servicer.Stream(object(), context)]

    stream_context = _Context()
    with pytest.raises(StreamAborted, match="server is shutting down"):
        asyncio.run(consume(stream_context))
    assert stream_context.code == grpc.StatusCode.UNAVAILABLE
    assert not servicer.ran


def test_serve_stopping_the_replica_starts_the_drain(monkeypatch):
    """The hook wraps the method Serve's controller calls to stop a replica (fails when renamed)."""
    from ray.serve._private import replica

    from services.ingress import drain_when_serve_stops_this_replica

    monkeypatch.setattr(
        replica.Replica, "perform_graceful_shutdown", replica.Replica.perform_graceful_shutdown
    )
    drain = Drain()
    drain_when_serve_stops_this_replica(drain)
    drain_when_serve_stops_this_replica(drain)  # a second Ingress in the process: wrapped once
    assert not drain.draining

    class _Replica:  # what Serve's own method touches: a stop already under way
        _graceful_shutdown_task = None

    async def stop():
        fake = _Replica()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        fake._graceful_shutdown_task = done
        await replica.Replica.perform_graceful_shutdown(fake)

    asyncio.run(stop())
    assert drain.draining


def test_the_first_stop_request_drains_and_the_second_ends_the_wait():
    requests = local.StopRequests()
    requests(signal.SIGTERM, None)
    assert requests.first.is_set() and not requests.second.is_set()
    requests(signal.SIGINT, None)
    assert requests.second.is_set()


def test_ray_init_keeps_the_servers_signal_handlers_and_its_processes_ignore_ctrl_c():
    def ours(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, ours), signal.signal(signal.SIGINT, ours)
    try:
        with local.signals_kept_from_ray():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # inherited by Ray's processes
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init does
        assert signal.getsignal(signal.SIGTERM) is ours and signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
