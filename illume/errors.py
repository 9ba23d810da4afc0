"""Error types of the core library.

Servers map these to wire status codes; each carries a one-line, user-facing reason and never a
stack trace. The mapping lives in ``services/`` (gRPC) so the core stays transport-free.
"""

from __future__ import annotations


class IllumeError(Exception):
    """Base class: ``reason`` is a single line safe to show to a client."""

    code = "INTERNAL"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason.splitlines()[0] if reason else self.code


class InvalidRequest(IllumeError):
    """The request is malformed or exceeds a limit (maps to INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class NotFound(IllumeError):
    """A referenced object does not exist (maps to NOT_FOUND)."""

    code = "NOT_FOUND"


class AlreadyExists(IllumeError):
    """An idempotency key was reused with a different body (maps to ALREADY_EXISTS)."""

    code = "ALREADY_EXISTS"


class ResourceExhausted(IllumeError):
    """A queue or quota is full (maps to RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(IllumeError):
    """No or an unknown credential (maps to UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(IllumeError):
    """The credential's role may not call this (maps to PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"


class FailedPrecondition(IllumeError):
    """The system is not in a state that allows the call (maps to FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"


class DeadlineExceeded(IllumeError):
    """The caller's deadline passed before the work started (maps to DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class Unimplemented(IllumeError):
    """The call exists in the contract but this server does not provide it (maps to UNIMPLEMENTED)."""

    code = "UNIMPLEMENTED"


class Unavailable(IllumeError):
    """A dependency is not ready yet; retry later (maps to UNAVAILABLE)."""

    code = "UNAVAILABLE"


def error_for_code(code: str, reason: str) -> IllumeError:
    """The error class of a status code name (INTERNAL for unknown names)."""
    for cls in IllumeError.__subclasses__():
        if cls.code == code:
            return cls(reason)
    return IllumeError(reason)
