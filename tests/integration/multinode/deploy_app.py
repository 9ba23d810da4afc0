"""Deploy the illume Serve application on a running cluster, as an operator's driver would.

Run inside a node of the cluster (the multi-node harness runs it in the serving node's
namespace): ``python deploy_app.py <gcs address> <AppConfig JSON file> <gRPC port>``. It connects
with ``ray.init(address=...)``, starts Serve with the illume gRPC servicers on ``<gRPC port>`` of
every proxy, runs ``services.app:build_app`` and returns once every deployment is healthy; the
application outlives this driver (Serve's controller is a detached actor).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    gcs_address, config_file, grpc_port = argv[0], Path(argv[1]), int(argv[2])
    import ray
    from ray import serve

    from services.app import build_app
    from services.config import APP_NAME, ROUTE_PREFIX, AppConfig
    from services.local import grpc_options

    config = AppConfig.model_validate_json(config_file.read_text())
    ray.init(address=gcs_address, log_to_driver=False)
    serve.start(http_options={"host": "0.0.0.0", "port": 8000}, grpc_options=grpc_options(grpc_port))
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX)
    print(f"deployed {APP_NAME} from node {ray.get_runtime_context().get_node_id()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
