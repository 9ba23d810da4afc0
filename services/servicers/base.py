"""What every RPC shares: authentication, role checks, status codes, metrics.

Serve's gRPC proxy answers INTERNAL with a stack trace when a method raises, so no method lets an
exception escape: core errors become their status code and one-line reason; a full queue becomes
RESOURCE_EXHAUSTED; anything unexpected is logged here and answered INTERNAL with a fixed line.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from illume.errors import IllumeError
from services import metrics
from services.auth import Authenticator, Caller

log = logging.getLogger("ray.serve")
INTERNAL_REASON = "internal error; see the server log"


class StreamAborted(Exception):
    """Ends a server stream after its status was set: Serve sends the status set on the context
    only with a message or when the method raises, and raising is what keeps the client from
    seeing a stray empty message before the error."""


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)


def _code_and_reason(exc: BaseException) -> tuple[str, str]:
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, IllumeError):
        return exc.code, exc.reason
    if isinstance(exc, BackPressureError):
        return "RESOURCE_EXHAUSTED", "the server's queue is full; retry later"
    if isinstance(exc, RayActorError | ActorUnavailableError | DeploymentUnavailableError):
        # A replica died or is restarting: the call may be retried (feedback is idempotent per key).
        log.warning(
            "a replica was unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        )
        return "UNAVAILABLE", "a server component is restarting; retry"
    log.exception("unexpected error in an RPC", exc_info=exc)
    return "INTERNAL", INTERNAL_REASON


class ServicerBase:
    """State the servicers share (set by the Ingress)."""

    auth: Authenticator

    def caller(self, grpc_context: Any) -> Caller:
        return self.auth.authenticate(grpc_context.invocation_metadata() if grpc_context else [])


def rpc(role: str, response: Callable[[], Any]) -> Callable:
    """Wrap a unary method ``(self, request, grpc_context, caller) -> reply``."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__

        @functools.wraps(method)
        async def unary(self: ServicerBase, request: Any, grpc_context: Any = None) -> Any:
            started, code = time.perf_counter(), "OK"
            try:
                caller = self.caller(grpc_context)
                caller.require(role)
                return await method(self, request, grpc_context, caller)
            except Exception as exc:
                code, reason = _code_and_reason(exc)
                if grpc_context is not None:
                    grpc_context.set_code(_status(code))
                    grpc_context.set_details(reason)
                return response()
            finally:
                metrics.record_request(name, code, (time.perf_counter() - started) * 1000)

        return unary

    return wrap


def rpc_stream(role: str) -> Callable:
    """Wrap a server-streaming method ``(self, request, grpc_context, caller) -> async iterator``."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__

        @functools.wraps(method)
        async def streaming(self: ServicerBase, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
            started, code = time.perf_counter(), "OK"
            try:
                caller = self.caller(grpc_context)
                caller.require(role)
                async for item in method(self, request, grpc_context, caller):
                    yield item
            except Exception as exc:
                code, reason = _code_and_reason(exc)
                if grpc_context is None:
                    raise
                grpc_context.set_code(_status(code))
                grpc_context.set_details(reason)
                raise StreamAborted(reason) from None
            finally:
                metrics.record_request(name, code, (time.perf_counter() - started) * 1000)

        return streaming

    return wrap
