"""Ray Serve deployments and Ray jobs that wire the ``illume`` core into a running service.

One module per deployment or job, named after it; ``app`` builds the Serve application from the
one config schema in ``config`` that ``serve run``, KubeRay's ``serveConfigV2`` and ``illume serve``
share. Protobuf conversion lives here (``convert``), never in the core.
"""
