"""One servicer per proto service; the Ingress deployment combines them.

Servicer methods are thin adapters: parse the protobuf (``services.convert``), call the core or a
deployment handle, build the reply. ``rpc``/``rpc_stream`` wrap each method with authentication,
the role check, the status-code mapping and the request metrics.
"""
