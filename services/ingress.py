"""The Ingress deployment: the gRPC entry point behind Serve's native gRPC proxy.

It combines one servicer per proto service (method names equal RPC names, as Serve's proxy
requires), authenticates every call from the metadata, validates through the core request types
and routes to the Generator and FeedbackLog deployments through their handles.
"""

from __future__ import annotations

from typing import Any

from ray import serve

import illume
from illume.store.registry import AdapterRegistry
from services.auth import Authenticator
from services.config import AppConfig
from services.servicers.admin import AdminServicer
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
        self.auth = Authenticator(config.auth)
        self.limits = config.ingress.limits
        self.generator = generator
        self.feedback_log = feedback_log
        self.store_backend = config.feedback_log.store.backend
        self.server_version = config.server_version or illume.__version__
