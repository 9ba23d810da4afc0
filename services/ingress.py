"""The Ingress deployment: the gRPC entry point behind Serve's native gRPC proxy.

It combines one servicer per proto service (method names equal RPC names, as Serve's proxy
requires), authenticates every call from the metadata, validates through the core request types
and routes to the Generator and FeedbackLog deployments through their handles.

At start it declares the configured namespaces (``AppConfig.namespaces``; audited when new) and
loads the keys; the keys file is re-read on change and each reload is audited as ``keys.reload``
(one event per Ingress replica that reloads).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ray import serve

import illume
from illume.store.registry import AdapterRegistry
from illume.store.types import Actor
from illume.validation import validate_namespace
from services.auth import Authenticator
from services.config import AppConfig
from services.servicers.admin import AdminServicer
from services.servicers.base import DeclaredNamespaces
from services.servicers.feedback import FeedbackServicer
from services.servicers.rationale import RationaleServicer


@serve.deployment
class Ingress(RationaleServicer, FeedbackServicer, AdminServicer):
    """RationaleService + FeedbackService + AdminService."""

    def __init__(
        self, config: AppConfig, generator: Any, feedback_log: Any, loop_controller: Any = None
    ) -> None:
        self.config = config
        self.registry = AdapterRegistry.open(config.feedback_log.store)
        self.loop_controller = loop_controller
        self.limits = config.ingress.limits
        for name in config.namespaces:
            self.registry.declare_namespace(validate_namespace(name, self.limits), Actor("system:config"))
        self.declared = DeclaredNamespaces(self.registry.declared_namespaces, config.auth.reload_interval_s)
        self.auth = Authenticator(config.auth, on_reload=self._audit_key_reload)
        self.generator = generator
        self.feedback_log = feedback_log
        self.store_backend = config.feedback_log.store.backend
        self.server_version = config.server_version or illume.__version__

    def _audit_key_reload(self, event: Mapping[str, Any]) -> None:
        # Off the event loop: the reload happens inside a call's authentication.
        threading.Thread(
            target=self.registry.record_audit,
            args=(Actor("system:ingress"), "keys.reload", "", dict(event)),
            name="illume-audit-key-reload",
            daemon=True,
        ).start()
