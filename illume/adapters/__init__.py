"""Adapters: how a trained LoRA adapter is stored, verified, loaded and routed.

- ``artifacts``: the artifact store (a local directory or an fsspec/S3 prefix) that adapter
  directories, and anything else that crosses processes, travel through;
- ``manifest``: the manifest of an adapter directory (files, sha256, provenance), its verification
  against the registry's copy, and ``publish_adapter`` (store the directory, register it);
- ``cache``: ``AdapterCache``, the adapters installed in one ``Generator`` (prepare off the hot
  path, inject between batches under the generation lock, LRU with pinning);
- ``routing``: ``AdapterRouter``, which version serves a request on a replica (aliases, pins,
  canary share) and the registry watcher that hot-reloads new versions.

Plain Python (no Ray, no protobuf); ``services.generator`` wires the router into a replica.
"""

import re

# The aliases a namespace routes by: production serves unpinned traffic, canary a configured share.
PRODUCTION = "production"
CANARY = "canary"
ALIASES = (PRODUCTION, CANARY)

# --- served names: an adapter's identity inside a replica -----------------------------------------
#
# Versions restart at 1 in every namespace, so inside serving an adapter is (namespace, version):
# the peft adapter name, the cache's entries, LRU and pinning, and the router's tables all use
# ``served_name(namespace, version)`` = ``ns-<namespace>--rationale-v<N>``. The wire label (the
# reply's and the log's ``adapter_version``) stays ``rationale-v<N>``: it is read within the
# request's namespace. A namespace is letters, digits, '-', '_' and '.'
# (``illume.validation.validate_namespace``): '-' (so also "--") may occur in it, so the name is
# parsed from its anchored end (the version has only digits, so the last "--rationale-v" is the
# separator); '.' may not appear in a peft adapter name (torch module keys), so it is written '~',
# which no namespace contains.
_SERVED_RE = re.compile(r"^ns-(.+)--rationale-v([1-9][0-9]{0,17})$")
_NAMESPACE_CHARS = frozenset("-_.")


def _namespace_ok(namespace: str) -> bool:
    return bool(namespace) and all(c.isalnum() or c in _NAMESPACE_CHARS for c in namespace)


def served_name(namespace: str, version: int) -> str:
    """The name a replica loads (namespace, version) under: ``ns-<namespace>--rationale-v<N>``."""
    if not _namespace_ok(namespace):
        raise ValueError(f"invalid namespace {namespace!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"invalid adapter version {version!r}")
    return f"ns-{namespace.replace('.', '~')}--rationale-v{version}"


def parse_served_name(name: str) -> tuple[str, int] | None:
    """(namespace, version) of a served name; None for any other string (the inverse of
    ``served_name``: ``served_name(*parse_served_name(n)) == n`` whenever it is not None)."""
    match = _SERVED_RE.match(name)
    if match is None:
        return None
    encoded, version = match.group(1), int(match.group(2))
    if "." in encoded:
        return None
    namespace = encoded.replace("~", ".")
    if not _namespace_ok(namespace) or served_name(namespace, version) != name:
        return None
    return namespace, version
