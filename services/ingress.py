"""The Ingress deployment: the gRPC entry point behind Serve's native gRPC proxy.

It combines one servicer per proto service (method names equal RPC names, as Serve's proxy
requires), authenticates every call from the metadata, validates through the core request types
and routes to the Generator and FeedbackLog deployments through their handles.

It also serves the annotation web app over HTTP (services/web.py; ``serve.ingress`` with the app
built per replica by ``__serve_build_asgi_app__``). A Serve application has one ingress, and Serve's
gRPC proxy routes a call that names no application only while exactly one application runs, so
a second application for the web would break every gRPC client that does not send the
``application`` metadata; the pages are served here instead. They call the RPC methods of this
replica in-process through ``call_rpc``, with the session's key, so every check a gRPC call gets
(key, role, namespace, audit, drain) applies to them unchanged.

At start it declares the configured namespaces (``AppConfig.namespaces``; audited when new) and
loads the keys; the keys file is re-read on change and each reload is audited as ``keys.reload``
(one event per Ingress replica that reloads).

Draining. An Ingress replica drains from the moment Serve starts to stop it
(``drain_when_serve_stops_this_replica``): it refuses every new call with UNAVAILABLE, "server is
shutting down", before reading the key, and the calls it admitted before run to their end. Serve's
graceful stop then waits until the replica has no call left (it looks every
``graceful_shutdown_wait_loop_s``, 2 s), and its controller kills the replica
``graceful_shutdown_timeout_s`` (= ``IngressSettings.shutdown_grace_s``, 30 s by default) after the
stop began. Both ways a replica stops go through it:

- ``illume serve`` on SIGTERM or Ctrl-C (services/local.py, "Stopping"): Serve's gRPC proxy is
  marked draining first, so its health check (``ray.serve.RayServeAPIService/Healthz``; the server
  has no ``grpc.health.v1`` service) answers UNAVAILABLE while the proxy still forwards calls; then
  this graceful stop runs on every Ingress replica; then Serve and Ray are shut down.
- KubeRay, a replica removed by a scale-down or a redeploy, or moved off a node Ray drains: Serve's
  controller takes it out of every router first (a long-poll update, milliseconds), then runs this
  graceful stop. A call a stale router still sends there is refused with UNAVAILABLE (nothing was
  done; the client or Envoy retries it, and it reaches another replica); the calls in flight get
  ``shutdown_grace_s``. On a node being drained (``ray drain-node``) Serve starts each replica's
  replacement elsewhere before stopping it, and the node's proxy answers Healthz with UNAVAILABLE
  for at least ``RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S`` (30 s) before it goes. A pod's SIGTERM
  itself stops every Ray process in it at once, without any of this: a pod's preStop has to drain
  its node and wait for the replicas to go (replacement start + ``shutdown_grace_s`` + 2 s) before
  the SIGTERM comes, and ``terminationGracePeriodSeconds`` must exceed that preStop.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from typing import Any

import grpc
from ray import serve

import illume
from illume.store.registry import AdapterRegistry
from illume.store.types import Actor
from illume.v1 import illume_pb2 as pb
from illume.validation import validate_namespace
from services.auth import Authenticator
from services.config import AppConfig
from services.servicers.admin import AdminServicer
from services.servicers.base import DeclaredNamespaces, Drain
from services.servicers.feedback import FeedbackServicer, SubmissionBatcher
from services.servicers.rationale import RationaleServicer

# The unary RPCs of the proto (the web app's calls go only to these).
UNARY_RPCS = frozenset(
    m.name
    for service in pb.DESCRIPTOR.services_by_name.values()
    for m in service.methods
    if not m.server_streaming and not m.client_streaming
)


def drain_when_serve_stops_this_replica(drain: Drain) -> None:
    """Begin ``drain`` the moment Serve starts the graceful stop of the replica in this process.

    Serve (2.60) tells a deployment nothing before it drains a replica (``__del__`` runs only after
    the calls in flight are done), and until it quiesces the replica admits every call a router
    still sends. Its controller stops a replica by calling ``perform_graceful_shutdown`` of the
    replica object in the replica's own process (one replica per process), so this wraps that
    method for this process. It fails the replica, loudly, when a Ray upgrade renamed it, and
    tests/unit/services/test_drain.py fails with it."""
    from ray.serve._private import replica

    cls = getattr(replica, "Replica", None)
    stop = getattr(cls, "perform_graceful_shutdown", None)
    if not inspect.iscoroutinefunction(stop):
        raise RuntimeError("this Ray has no hook for a replica's graceful stop; see services/ingress.py")
    original = getattr(stop, "__wrapped__", stop)  # a second Ingress in this process replaces the first

    async def perform_graceful_shutdown(self: Any) -> None:
        drain.begin("Serve is stopping this replica")
        await original(self)

    perform_graceful_shutdown.__wrapped__ = original  # type: ignore[attr-defined]
    cls.perform_graceful_shutdown = perform_graceful_shutdown


async def web_disabled(scope: dict, receive: Any, send: Any) -> None:
    """The ASGI app of a server with the web app switched off: 404 for every HTTP request."""
    if scope["type"] != "http":
        return
    body = b"the annotation web app is disabled on this server (web.enabled: false)\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class WebCallContext:
    """The part of a gRPC servicer context the RPC methods use, for calls made by the web app:
    the session's key as ``authorization`` metadata in, the status code and details out."""

    def __init__(self, api_key: str) -> None:
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self.code: grpc.StatusCode = grpc.StatusCode.OK
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@serve.deployment
@serve.ingress()
class Ingress(RationaleServicer, FeedbackServicer, AdminServicer):
    """RationaleService + FeedbackService + AdminService, and the web app over HTTP."""

    def __init__(
        self, config: AppConfig, generator: Any, feedback_log: Any, loop_controller: Any = None
    ) -> None:
        self.config = config
        self.drain = Drain()
        drain_when_serve_stops_this_replica(self.drain)
        self.registry = AdapterRegistry.open(config.feedback_log.store)
        self.loop_controller = loop_controller
        self.limits = config.ingress.limits
        for name in config.namespaces:
            self.registry.declare_namespace(validate_namespace(name, self.limits), Actor("system:config"))
        self.declared = DeclaredNamespaces(self.registry.declared_namespaces, config.auth.reload_interval_s)
        self.auth = Authenticator(config.auth, on_reload=self._audit_key_reload)
        self.generator = generator
        self.feedback_log = feedback_log
        self.feedback_batcher = SubmissionBatcher(feedback_log.submit_feedback_batch.remote)
        self.store_backend = config.feedback_log.store.backend
        self.server_version = config.server_version or illume.__version__

    def __serve_build_asgi_app__(self) -> Any:
        if not self.config.web.enabled:
            return web_disabled
        from services.web import create_web_app

        return create_web_app(self, self.config.web)

    async def call_rpc(self, method: str, request: Any, api_key: str) -> Any:
        """Run the unary RPC ``method`` as a gRPC call with ``api_key`` would run; raise
        ``services.web.RpcFailed`` with its status name and reason when it does not end OK."""
        from services.web import RpcFailed

        if method not in UNARY_RPCS:
            raise RpcFailed("UNIMPLEMENTED", f"{method} is not a unary RPC of this server")
        context = WebCallContext(api_key)
        reply = await getattr(self, method)(request, context)
        if context.code != grpc.StatusCode.OK:
            raise RpcFailed(context.code.name, context.details)
        return reply

    def _audit_key_reload(self, event: Mapping[str, Any]) -> None:
        # Off the event loop: the reload happens inside a call's authentication.
        threading.Thread(
            target=self.registry.record_audit,
            args=(Actor("system:ingress"), "keys.reload", "", dict(event)),
            name="illume-audit-key-reload",
            daemon=True,
        ).start()
