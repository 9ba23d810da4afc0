"""Seeds derived from names: the same parts give the same seed on every machine and in every order.

Contract: ``derived_seed(*parts)`` is the first 6 bytes (big-endian) of the SHA-256 of the parts'
``str()`` joined by ``/``: below 2**48, so it fits every seed field (uint64 on the wire, int64 in
torch). Callers put their own label first (``"illume-eval"``, ``"illume-loop"``, ...) so their
seeds do not collide. No third-party imports: clients such as ``illume simulate`` use it.
"""

from __future__ import annotations

import hashlib


def derived_seed(*parts: object) -> int:
    """The seed of ``parts`` (see the module docstring)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


__all__ = ["derived_seed"]
