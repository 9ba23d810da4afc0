"""Integration tests share the session's Ray cluster and Serve instance (tests/conftest.py)."""

from tests.conftest import free_port

__all__ = ["free_port"]
