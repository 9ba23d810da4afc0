"""Adapter routing on a Generator replica: which adapter serves a request.

``resolve(ref, namespace)`` turns what a client asked for ("" for the namespace's routing,
"base", a version "7"/"rationale-v7", or an alias) into a ``Resolution``: the version label that
the reply will name and the installed peft adapter to run (None for the base model), or an error.
It is called when a batch forms, so a request never names a version the replica lacks.

Until a registry with promoted adapters is configured, everything resolves to the base model and
any other pin is NOT_FOUND.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from illume.generation import GenerateRequest, GenerateResult, Generator
from illume.store.registry import parse_version

BASE_LABEL = "base"


@dataclass(frozen=True)
class Resolution:
    """The adapter chosen for one request (or why none could be)."""

    version_label: str = BASE_LABEL
    adapter_name: str | None = None
    error_code: str = ""
    error_reason: str = ""


class AdapterRouter:
    """Resolves adapter references and runs batches on the core generator."""

    def __init__(self, core: Generator, settings: Any, store: Any = None, artifact_uri: str = "") -> None:
        self.core = core
        self.settings = settings

    def resolve(self, ref: str, namespace: str) -> Resolution:
        ref = (ref or "").strip()
        if ref in ("", BASE_LABEL):
            return Resolution()
        kind = "version" if parse_version(ref) is not None else "alias"
        return Resolution(error_code="NOT_FOUND", error_reason=f"adapter {kind} {ref!r} is not available")

    def bind(self, request: GenerateRequest, resolution: Resolution) -> GenerateRequest:
        return replace(request, adapter=resolution.adapter_name)

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return self.core.generate(requests)

    def loaded_names(self) -> list[str]:
        return self.core.adapter_names()

    def alias_lines(self) -> list[str]:
        return []
