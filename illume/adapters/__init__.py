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

# The aliases a namespace routes by: production serves unpinned traffic, canary a configured share.
PRODUCTION = "production"
CANARY = "canary"
ALIASES = (PRODUCTION, CANARY)
