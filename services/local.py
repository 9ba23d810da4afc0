"""``illume serve``: the whole server on one machine (a local Ray cluster plus the Serve app).

It starts a local Ray cluster (free ports, never Redis's 6379), Serve's gRPC proxy on the
configured host and port, and the application from ``services.app:build_app`` with the embedded
default (the project's model, an SQLite feedback log and an artifact directory under the data
directory). Local API keys are created once under ``<data>/keys/`` (the config holds only their
sha256). It prints a ready line once the model is loaded and answers.

Stopping, on SIGTERM or Ctrl-C (``drain_local_server``; services/ingress.py has the replica's side):
1. Serve's gRPC proxy is marked draining: its health check, ``ray.serve.RayServeAPIService/Healthz``
   (the server exposes no ``grpc.health.v1`` service), answers UNAVAILABLE "This node is being
   drained."; the proxy keeps forwarding calls, so those in flight get their answers.
2. The graceful stop of every Ingress replica begins: new calls are refused with UNAVAILABLE
   "server is shutting down"; the Generator and FeedbackLog keep serving the calls admitted before.
3. Once no Ingress replica has a call left (Serve looks every 2 s), or ``ingress.shutdown_grace_s``
   (+5 s) has passed, Serve and Ray are shut down and the process exits 0. A second SIGTERM or
   Ctrl-C ends the wait at once.
Measured (tests/integration/services/test_shutdown.py, six Generate calls in flight, embedded
model, 2 shared cores, four runs): health NOT_SERVING at the first probe (0.01-0.16 s after
SIGTERM), the last call answered 1.2-3.5 s after it, exit 0 after 7.7-11.8 s (the drain ends at
Serve's next 2 s check, then stopping Serve and Ray takes 5-8 s).
Ray's processes ignore SIGINT, so Ctrl-C in the terminal (which signals the whole process group)
drains as SIGTERM does. SIGTERM is for this process alone: sent to its whole process group (GNU
``timeout``, systemd's default ``KillMode=control-group``; use ``KillMode=mixed``) it also stops
Ray's GCS at once, and no drain is possible.

Where it listens (docs/SERVING.md, "Where the local server listens"): the gRPC proxy on
``--host`` (default 127.0.0.1), everything else of the cluster on loopback only. Ray binds its own
servers to loopback when the node's IP is loopback (``local_only_ray``); Serve binds its gRPC proxy
and each replica's inter-deployment server to ``[::]`` with no host option, so a worker setup hook
(``bind_serve_servers``) gives them their address. Reflection is off: Serve answers it on the proxy,
before the Ingress checks the API key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from services.auth import key_sha256
from services.config import (
    APP_NAME,
    DEFAULT_GRPC_MAX_MESSAGE_BYTES,
    ROUTE_PREFIX,
    SERVICER_FUNCTIONS,
    WORLD_GATE_ITEMS,
    AppConfig,
    TuningSettings,
    default_config,
)

if TYPE_CHECKING:
    from illume.cli.config_flags import Flag

ROLES = ("client", "annotator", "admin")
# Where `illume serve` listens for gRPC unless --host says otherwise.
DEFAULT_HOST = "127.0.0.1"
LOOPBACK = "127.0.0.1"
# Ray takes loopback as the node's IP (and then binds GCS, raylet, workers, agents and metrics to
# loopback) only while multi-node clusters are switched off: the switch Ray uses on macOS/Windows.
RAY_CLUSTER_SWITCH_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The address Serve's gRPC proxy binds on the local cluster (read by bind_serve_servers in workers).
GRPC_HOST_ENV = "ILLUME_GRPC_HOST"
SETUP_HOOK = "services.local.bind_serve_servers"
# How long `illume serve` waits for a Ray cluster stopped just before to release its agent port.
AGENT_PORT_WAIT_S = 30.0
# Beyond shutdown_grace_s: Serve's wait loop (2 s) and the replies of the replicas' graceful stops.
DRAIN_MARGIN_S = 5.0
INGRESS_DEPLOYMENT = "Ingress"


def ensure_local_keys(data_dir: Path) -> Path:
    """Create one key per role under ``<data>/keys/`` (mode 0600) once; return the hashed key file."""
    keys_dir = data_dir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for role in ROLES:
        path = keys_dir / f"{role}.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
        # A one-machine server: every key may use every namespace (docs/SERVING.md, "Keys").
        entries.append(
            {
                "sha256": key_sha256(path.read_text().strip()),
                "role": role,
                "principal": f"local-{role}",
                "namespaces": ["*"],
            }
        )
    hashed = data_dir / "api_keys.json"
    hashed.write_text(json.dumps(entries, indent=1))
    return hashed


WEB_SECRET_BYTES = 32
DEFAULT_HTTP_PORT = 8080


def ensure_web_secret(data_dir: Path) -> Path:
    """The session secret of the web app under ``<data>/keys/`` (mode 0600), created once, so that
    sessions survive a restart of the local server."""
    path = data_dir / "keys" / "web-session.secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(WEB_SECRET_BYTES))
    return path


# The embedded model's replay pool: world questions of a seed no evaluation or simulation uses.
REPLAY_WORLD_SEED = 7
REPLAY_WORLD_ITEMS = 2000


# The embedded model's curated gate set: val questions of a world seed nothing else uses.
GATE_WORLD_SEED = 13


def _world_split_once(directory: Path, split: str, items: int, seed: int) -> Path:
    """``<directory>/<split>.json``: a world of ``seed`` holding only that split (built once, and
    again when the file holds another number of items -- a data dir from a release with another
    size -- or cannot be read, as after a build that was cut short; the items are a function of
    the seed and their index, so a rebuild changes nothing but the size)."""
    from illume.world import build_world

    path = directory / f"{split}.json"
    if _items_in(path) != items:
        build_world(directory, {"train": 0, "val": 0, "test": 0, split: items}, seed=seed)
    return path


def _items_in(path: Path) -> int | None:
    """How many items a world split file holds (None: absent or unreadable)."""
    try:
        return len(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def default_replay_data(data_dir: Path) -> Path:
    """The replay pool of the embedded default model (built under ``<data>/replay`` once)."""
    return _world_split_once(data_dir / "replay", "train", REPLAY_WORLD_ITEMS, REPLAY_WORLD_SEED)


def default_gate_world(data_dir: Path) -> Path:
    """The embedded default model's curated gate set (built under ``<data>/gate-world`` once)."""
    return _world_split_once(data_dir / "gate-world", "val", WORLD_GATE_ITEMS, GATE_WORLD_SEED)


def local_config(data_dir: Path, model_dir: Path | None, config_file: Path | None) -> AppConfig:
    """The embedded default (or a YAML/JSON AppConfig file), with local keys wired in.

    Paths are made absolute: Ray workers and jobs run in other working directories."""
    data_dir = Path(data_dir).resolve()
    model_dir = Path(model_dir).resolve() if model_dir is not None else None
    if config_file is not None:
        import yaml

        config = AppConfig.model_validate(yaml.safe_load(config_file.read_text()))
    else:
        from illume.models.default import default_model_dir

        embedded = model_dir is None
        replay = default_replay_data(data_dir) if embedded else None
        gate_world = default_gate_world(data_dir) if embedded else None
        config = default_config(data_dir, model_dir or default_model_dir(data_dir), replay, gate_world)
    if config.auth.enabled and not config.auth.keys and config.auth.keys_file is None:
        config = config.model_copy(
            update={"auth": config.auth.model_copy(update={"keys_file": ensure_local_keys(data_dir)})}
        )
    if config.web.enabled and config.web.session_secret_file is None:
        web = config.web.model_copy(update={"session_secret_file": ensure_web_secret(data_dir)})
        config = config.model_copy(update={"web": web})
    return config


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC and clients spell it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_target(host: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on ``host`` (a wildcard address
    is reached through loopback)."""
    if host in ("0.0.0.0", ""):
        host = LOOPBACK
    elif host == "::":
        host = "::1"
    return host_port(host, port)


def local_only_ray() -> None:
    """Make the cluster started next in this process take loopback as its node IP.

    Ray then binds GCS, the raylet, the object manager, every worker's gRPC server, the dashboard
    agent, the runtime env agent and the metrics servers to 127.0.0.1 (it chooses loopback or all
    interfaces from the node IP). ``ray.init(_node_ip_address="127.0.0.1")`` does not do this: Ray
    replaces a loopback address by the machine's reachable one unless multi-node clusters are off.
    The environment variable reaches Ray's processes; the constant is read when ``ray`` is imported,
    so it is set too when ``ray`` was imported already."""
    os.environ[RAY_CLUSTER_SWITCH_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def bind_serve_servers() -> None:
    """Ray ``worker_process_setup_hook`` of the local cluster: Serve's gRPC servers listen where the
    server says, not on every interface.

    Serve (2.60) binds its gRPC proxy to ``[::]:<port>`` and each replica's inter-deployment gRPC
    server to ``[::]:0`` and has no option for either. This hook runs in every worker of the
    cluster before any actor class is loaded and replaces the two functions that add those ports:
    the proxy binds ``$ILLUME_GRPC_HOST`` and a replica's own server binds loopback (on one machine
    every caller is local). It fails the worker, loudly, when a Ray upgrade renamed them, and
    tests/integration/services/test_local_binding.py fails when a port of the local cluster
    listens beyond loopback."""
    host = os.environ.get(GRPC_HOST_ENV)
    if not host:
        return
    from ray._common import tls_utils
    from ray.serve._private import default_impl

    if not callable(getattr(default_impl, "add_grpc_address", None)) or not callable(
        getattr(tls_utils, "add_port_to_grpc_server", None)
    ):
        raise RuntimeError("this Ray has no hook for Serve's gRPC bind address; see services/local.py")
    add_port = tls_utils.add_port_to_grpc_server

    def add_port_on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = host_port(LOOPBACK, int(address.rpartition(":")[2]))
        return add_port(server, address)

    def add_grpc_address(server, address: str) -> None:
        port = int(address.rpartition(":")[2])
        server.add_insecure_port(host_port(host, port))

    tls_utils.add_port_to_grpc_server = add_port_on_loopback
    replica = sys.modules.get("ray.serve._private.replica")  # imported later, normally
    if replica is not None:
        replica.add_port_to_grpc_server = add_port_on_loopback
    default_impl.add_grpc_address = add_grpc_address


def local_runtime_env(host: str = DEFAULT_HOST) -> dict:
    """The job ``runtime_env`` of a local cluster: offline model hub, and ``bind_serve_servers`` in
    every worker with the gRPC proxy's address."""
    return {
        "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", GRPC_HOST_ENV: host},
        "worker_process_setup_hook": SETUP_HOOK,
    }


def grpc_options(port: int):
    """Serve's gRPC proxy options: the illume servicers on ``port``, reflection off (Serve answers
    reflection on the proxy itself, before the Ingress checks the API key)."""
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS, enable_reflection=False)


def start(
    config: AppConfig,
    grpc_port: int,
    num_cpus: int,
    dashboard: bool = True,
    host: str = DEFAULT_HOST,
    http_port: int = DEFAULT_HTTP_PORT,
) -> None:
    """Start Ray and the Serve application; returns once every deployment is healthy.

    When this starts the cluster, Ray's ports listen on loopback and the gRPC proxy and (with the
    web app on) the HTTP proxy on ``host``; a cluster started before by the caller keeps its own
    binding."""
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(DEFAULT_GRPC_MAX_MESSAGE_BYTES))
    import ray

    if not ray.is_initialized():
        local_only_ray()
    from ray import serve

    from services.app import build_app

    if not ray.is_initialized():
        with signals_kept_from_ray():
            context = ray.init(
                num_cpus=num_cpus,
                include_dashboard=dashboard,
                dashboard_host=LOOPBACK,
                log_to_driver=False,
                runtime_env=local_runtime_env(host),
            )
        config = with_local_jobs_api(config, context.dashboard_url)
    http = {"host": host, "port": http_port} if config.web.enabled else {"host": LOOPBACK, "port": 0}
    serve.start(
        http_options=http,
        grpc_options=grpc_options(grpc_port),
        logging_config={"enable_access_log": config.access_log},
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX)


def with_local_jobs_api(config: AppConfig, dashboard_url: str | None) -> AppConfig:
    """Point the default Jobs API address at the dashboard of the cluster started here.

    The dashboard takes another port when 8265 is taken (another local cluster), and rounds
    submitted to the default address would then fail or reach the wrong cluster. An address set
    in the config on purpose is kept."""
    default = TuningSettings.model_fields["jobs_api_address"].default
    if not dashboard_url or config.tuning.jobs_api_address != default:
        return config
    tuning = config.tuning.model_copy(update={"jobs_api_address": f"http://{dashboard_url}"})
    return config.model_copy(update={"tuning": tuning})


def ensure_port_free(port: int, name: str = "gRPC port") -> None:
    """Refuse a port another process listens on.

    gRPC binds with SO_REUSEPORT, so a second server on the same port would start and silently
    share the connections with the first; a plain bind (no reuse) fails instead."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine
        with probe:
            try:
                probe.bind((host, port))
            except OSError as error:
                raise RuntimeError(f"{name} {port} is in use ({error.strerror})") from None


def wait_until_port_free(port: int, name: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Wait up to ``timeout_s`` for ``port`` to be free (a cluster stopped just before may still
    hold it); raise ``RuntimeError`` if it is still taken then."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ensure_port_free(port, name)
            return
        except RuntimeError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(poll_s)


def ray_agent_port() -> int:
    """The port of Ray's dashboard agent, which ``ray.init`` cannot change.

    Two local clusters clash on it: the second one's agent serves no HTTP, its Jobs API answers
    "No available agent to submit job", and every tuning round fails to start."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    return DEFAULT_DASHBOARD_AGENT_LISTEN_PORT


def drain_local_server(grace_s: float, interrupted: threading.Event | None = None) -> int:
    """Drain the local server before it stops: Serve's proxies report NOT_SERVING, every Ingress
    replica refuses new calls (UNAVAILABLE), and this returns once the calls they admitted are done,
    or after ``grace_s`` (or when ``interrupted`` is set). Returns how many Ingress replicas still
    had calls in flight then.

    ``serve.shutdown()`` alone kills the proxies at once and every call in flight fails with
    UNAVAILABLE, so the local runner starts the replicas' graceful stop itself (the controller does
    the same on scale-down; a replica stopped twice finishes the first stop). The actors are
    found by the names Serve gives them (``SERVE_PROXY_ACTOR-<node>``,
    ``SERVE_REPLICA::<app>#<deployment>#<id>`` in namespace ``serve``)."""
    import ray

    if not ray.is_initialized():
        return 0
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == SERVE_NAMESPACE
    ]
    proxies = [ray.get_actor(n, namespace=SERVE_NAMESPACE) for n in names if n.startswith(SERVE_PROXY_NAME)]
    ray.get([proxy.update_draining.remote(True) for proxy in proxies], timeout=DRAIN_MARGIN_S)
    ingress = DeploymentID(name=INGRESS_DEPLOYMENT, app_name=APP_NAME)
    replicas = [
        ray.get_actor(n, namespace=SERVE_NAMESPACE)
        for n in names
        if ReplicaID.is_full_id_str(n) and ReplicaID.from_full_id_str(n).deployment_id == ingress
    ]
    pending = [replica.perform_graceful_shutdown.remote() for replica in replicas]
    deadline = time.monotonic() + grace_s + DRAIN_MARGIN_S
    while pending and time.monotonic() < deadline and not (interrupted and interrupted.is_set()):
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
    return len(pending)


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


class StopRequests:
    """SIGTERM and Ctrl-C once Serve is up: the first drains the server, a second ends the wait."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.second = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        (self.second if self.first.is_set() else self.first).set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)


@contextlib.contextmanager
def signals_kept_from_ray() -> Iterator[None]:
    """Around ``ray.init``: this process keeps its own SIGTERM and SIGINT handlers, and the processes
    Ray starts (GCS, raylet, agents, and the workers the raylet starts later) ignore SIGINT.

    ``ray.init`` installs a SIGTERM handler that exits at once, skipping the drain. Ctrl-C in a
    terminal reaches the whole process group; Ray's processes are in it and would die before the
    calls in flight are answered. An ignored signal stays ignored across exec, and Python leaves an
    ignored SIGINT alone; ``ray.shutdown`` stops them with SIGTERM. (Ctrl-C in the few seconds of
    ``ray.init`` is ignored too.)"""
    sigterm = signal.getsignal(signal.SIGTERM)
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        signal.signal(signal.SIGINT, sigint)


def drain_before_stop(grace_s: float, interrupted: threading.Event) -> None:
    """``drain_local_server`` with what it did printed; a failure is one line, and the stop goes on."""
    print(f"illume: draining (calls in flight get up to {grace_s:g} s; again to stop now)", flush=True)
    started = time.monotonic()
    try:
        busy = drain_local_server(grace_s, interrupted)
    except Exception as error:  # the cluster is going away anyway; say why the drain was cut short
        print(f"illume: drain failed ({type(error).__name__}: {str(error).splitlines()[0]})", flush=True)
        return
    outcome = f"{busy} Ingress replica(s) still busy" if busy else "no call in flight"
    print(f"illume: drained in {time.monotonic() - started:.1f} s, {outcome}", flush=True)


def web_address(host: str, port: int) -> str:
    """The URL of the web app as a browser on this machine reaches it."""
    return f"http://{client_target(host, port)}/"


def print_ready_line(
    config: AppConfig, data_dir: Path, host: str, grpc_port: int, http_port: int = DEFAULT_HTTP_PORT
) -> None:
    """Wait until the server answers, then print where it listens and how to call it."""
    from illume.client import IllumeClient

    key_file = data_dir / "keys" / "admin.key"
    target = client_target(host, grpc_port)
    with IllumeClient(target, api_key_file=key_file if key_file.exists() else None) as c:
        status = c.server_status(timeout=60)
    print(
        f"illume ready: gRPC on {host_port(host, grpc_port)}, model {status.model_id}, "
        f"feedback log {config.feedback_log.store.url}\n"
        f"  try: illume client generate --target {target} "
        "--image IMAGE --question 'what is shown?'\n"
        f"  keys: {data_dir / 'keys'}/{{client,annotator,admin}}.key",
        flush=True,
    )
    if config.web.enabled:
        print(
            f"  web: annotation app on {web_address(host, http_port)} (sign in with "
            f"{data_dir / 'keys'}/annotator.key or admin.key)",
            flush=True,
        )


def run_forever(
    data_dir: Path,
    model_dir: Path | None,
    config_file: Path | None,
    grpc_port: int,
    num_cpus: int,
    config: AppConfig | None = None,
    host: str = DEFAULT_HOST,
    http_port: int = DEFAULT_HTTP_PORT,
) -> int:
    """``illume serve``: start, print the ready line, wait for Ctrl-C or SIGTERM, drain, stop
    (``config``: the one to serve, else ``local_config``'s; ``host``: where the gRPC proxy
    listens)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = config or local_config(data_dir, model_dir, config_file)
    try:
        ensure_port_free(grpc_port)
        if config.web.enabled:
            ensure_port_free(http_port, "HTTP port")
    except RuntimeError as error:
        print(
            f"illume serve: {error}; stop the other server or pass --grpc-port/--http-port", file=sys.stderr
        )
        return 2
    try:
        # Only rounds need the agent (their jobs go through it); a server without tuning may share
        # the machine with another cluster (a test session's, for one).
        if config.tuning.enabled:
            wait_until_port_free(ray_agent_port(), "Ray's dashboard agent port", AGENT_PORT_WAIT_S)
    except RuntimeError as error:
        print(
            f"illume serve: {error}: another local Ray cluster holds it, and this server's tuning "
            "rounds could not submit their jobs; stop that cluster first",
            file=sys.stderr,
        )
        return 2
    stop_requests = StopRequests()
    signal.signal(signal.SIGTERM, stop_requests)  # Ctrl-C while starting stays KeyboardInterrupt
    try:
        start(config, grpc_port, num_cpus, host=host, http_port=http_port)
        stop_requests.install()  # a SIGTERM that came while Serve was starting is kept
        print_ready_line(config, data_dir, host, grpc_port, http_port)
        while not stop_requests.first.wait(0.5):
            pass
        drain_before_stop(config.ingress.shutdown_grace_s, stop_requests.second)
    except KeyboardInterrupt:
        pass
    finally:
        print("illume: shutting down", flush=True)
        stop()
    return 0


# --- the `illume serve` and `illume tune` verbs (entry points of the group illume.cli) ------------


def tuning_flags() -> list[Flag]:
    """The ``AppConfig.tuning`` fields ``illume serve`` and ``illume tune`` take as flags: how a round
    trains (``illume loop``'s spellings), its snapshot, the gate and the training workers. The rest
    (the controller's timing, storage, curated gate sets, ...) comes from ``--config``."""
    from illume.cli.config_flags import Flag, train_flags

    return [
        *train_flags("tuning.train"),
        Flag("tuning.snapshot.replay_ratio"),
        Flag("tuning.gate.min_items", "gate_min_items"),
        Flag("tuning.gate.allow_empty", "gate_allow_empty"),
        Flag("tuning.gate.default_tolerance", "gate_default_tolerance"),
        Flag("tuning.gate.tokenize", "gate_tokenize"),
        Flag("tuning.gate_max_items"),
        Flag("tuning.num_workers"),
        Flag("tuning.use_gpu"),
        Flag("tuning.cpus_per_worker"),
        Flag("tuning.schedule_timeout_s"),
        Flag("tuning.keep_last"),
    ]


def serve_flags() -> list[Flag]:
    """The ``AppConfig`` fields ``illume serve`` takes as flags: the Generator's batching and
    replicas, whether and when the controller starts rounds, and ``tuning_flags()``. Placement,
    autoscaling, auth, the store and the artifact store come from ``--config``."""
    from illume.cli.config_flags import Flag

    return [
        Flag("generator.max_batch_size"),
        Flag("generator.batch_wait_timeout_s"),
        Flag("generator.max_concurrent_batches"),
        Flag("generator.max_queued_requests"),
        Flag("generator.num_replicas"),
        Flag("tuning.enabled", "tuning"),
        Flag("tuning.min_new_judgements"),
        Flag("tuning.check_interval_s"),
        *tuning_flags(),
    ]


def add_app_arguments(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    """``--data-dir``, ``--model``, ``--config`` and ``flags``, bound to ``AppConfig`` with the
    embedded default's values shown (``app_config`` builds the config from them)."""
    from illume.cli.config_flags import ConfigFlags

    parser.add_argument(
        "--data-dir", default=".data", help="feedback log, adapters and local keys (default .data)"
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint directory (default: the embedded default model)"
    )
    parser.add_argument(
        "--config", default=None, help="an AppConfig YAML file (the Serve application's args)"
    )
    # The defaults that apply without --config: the embedded model's (its replay pool included).
    embedded = default_config(
        Path(".data"), Path("MODEL"), replay_data=Path("replay.json"), gate_world=Path("gate-world.json")
    )
    bound = ConfigFlags(AppConfig, flags, embedded)
    bound.add_to(
        parser,
        "server settings (AppConfig)",
        "Defaults are the embedded default's; with --config FILE the file's values apply instead, "
        "and a flag given overrides either.",
    )
    parser.set_defaults(config_flags=bound, build_config=app_config)


def app_config(args: argparse.Namespace) -> AppConfig:
    """``local_config`` (the embedded default or ``--config``) with the flags given applied."""
    config = local_config(
        Path(args.data_dir),
        Path(args.model) if args.model else None,
        Path(args.config) if args.config else None,
    )
    return args.config_flags.apply(config, args)


def configure_serve(parser: argparse.ArgumentParser) -> None:
    """run the server on this machine (local Ray cluster)"""
    add_app_arguments(parser, serve_flags())
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address the gRPC and HTTP proxies listen on (default 127.0.0.1; 0.0.0.0 or :: for "
        "every interface); Ray's own ports stay on loopback",
    )
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument(
        "--http-port", type=int, default=DEFAULT_HTTP_PORT, help="port of the annotation web app (HTTP)"
    )
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from illume.cli import offline

    offline()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    config = app_config(args)
    return run_forever(
        data_dir,
        None,
        None,
        args.grpc_port,
        args.num_cpus,
        config=config,
        host=args.host,
        http_port=args.http_port,
    )
