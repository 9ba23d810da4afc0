"""A multi-node Ray cluster on one machine: network, PID and mount namespaces per node.

Topology:

- a bridge ``illume-mn-br`` on 10.77.0.0/24; the root namespace is 10.77.0.1 and hosts what a
  deployment keeps outside the Ray cluster: an S3 endpoint (moto in server mode) and a TCP
  forwarder to the root namespace's PostgreSQL (which listens on loopback only);
- each Ray node is a separate ``ray start --block`` process in its own network namespace (so
  127.0.0.1 on one node is not another's), its own PID namespace (a driver finds its node's raylet
  by listing processes) and its own mount namespace with a tmpfs on /tmp, with its own home and
  working directory (so a path written under /tmp on one node is absent on the others): a head
  with 0 CPUs, a serving node with the ``illume-serve`` resource and a training node with the
  ``illume-train`` resource; drivers run inside a node with ``Cluster.run_in``;
- Ray's token authentication is on: every node and every client gets the same token.

Only root can make namespaces; ``skip_reason`` says why the test cannot run elsewhere. Everything
this module creates carries the ``illume-mn`` prefix, and ``remove_leftovers`` deletes whatever a
crashed run left behind before a new cluster starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "illume-mn"
BRIDGE = f"{PREFIX}-br"
SUBNET_PREFIX = 24
ROOT_IP = "10.77.0.1"
GCS_PORT = 6380  # never Redis's 6379
DASHBOARD_PORT = 8265
# Ray needs at least this much object store per node; more would only reserve /dev/shm for nothing.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
# A node's /tmp holds Ray's session directory (logs, sockets, spilled objects) and the rounds'
# scratch files; tmpfs pages are only used when written.
NODE_TMPFS_SIZE = "4g"
RAY_STARTUP_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
# Environment a node must not inherit from the test process: a local cluster's settings (for
# example the loopback-only switch services.local sets) or another cluster's address.
INHERITED_PREFIXES_DROPPED = ("RAY_", "ILLUME_GRPC_HOST")


@dataclass(frozen=True)
class NodeSpec:
    """One Ray node: its namespace's name and address, and what it declares to Ray."""

    name: str
    ip: str
    num_cpus: float
    resources: Mapping[str, float] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def host_veth(self) -> str:
        return f"imn-{self.name}-h"  # interface names have at most 15 characters

    @property
    def node_veth(self) -> str:
        return f"imn-{self.name}-n"


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network and mount namespaces needs root"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{PREFIX}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "exec", probe, "unshare", "--mount", "--propagation", "private", "true"])
    except subprocess.CalledProcessError as error:
        return f"`ip netns` or `unshare -m` is unavailable here: {error.stderr.strip()[:200]}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


def _netns_pids(netns: str) -> list[int]:
    listed = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
    return [int(pid) for pid in listed if pid.isdigit()]


def _kill_all_in(netns: str, grace_s: float) -> None:
    """SIGTERM every process of the namespace, then SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _netns_pids(netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while _netns_pids(netns) and time.monotonic() < deadline:
            time.sleep(0.2)
    if _netns_pids(netns):
        raise RuntimeError(f"processes {_netns_pids(netns)} of {netns} survived SIGKILL")


def remove_leftovers(grace_s: float = 2.0) -> None:
    """Delete this harness's namespaces (and their processes) and bridge, from any earlier run."""
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{PREFIX}-"):
            _kill_all_in(name, grace_s)
            _run(["ip", "netns", "del", name], check=False)
    if _run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        _run(["ip", "link", "del", BRIDGE])


def create_network(nodes: list[NodeSpec]) -> None:
    """The bridge with the root namespace's address, and one namespace per node wired to it."""
    _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "addr", "add", f"{ROOT_IP}/{SUBNET_PREFIX}", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    for node in nodes:
        inside = ["ip", "netns", "exec", node.netns]
        _run(["ip", "netns", "add", node.netns])
        _run(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", node.node_veth])
        _run(["ip", "link", "set", node.node_veth, "netns", node.netns])
        _run(["ip", "link", "set", node.host_veth, "master", BRIDGE, "up"])
        _run([*inside, "ip", "addr", "add", f"{node.ip}/{SUBNET_PREFIX}", "dev", node.node_veth])
        _run([*inside, "ip", "link", "set", node.node_veth, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])


def wait_for_port(host: str, port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout_s:g}s") from error
            time.sleep(0.3)


def free_port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TcpForwarder:
    """Accepts on ``listen`` and pipes each connection to ``target`` (a thread per connection).

    PostgreSQL listens on the root namespace's loopback only; the nodes reach it through this
    forwarder on the bridge address, as pods reach a database Service."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(listen, reuse_port=False)
        self._server.settimeout(0.5)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="pg-forwarder", daemon=True)

    def start(self) -> TcpForwarder:
        self._accepting.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        with client, upstream:
            ends = {client: upstream, upstream: client}
            while not self._stop.is_set():
                readable, _, _ = select.select(list(ends), [], [], 0.5)
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    ends[sock].sendall(data)

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)


def node_environment(token: str, home: Path) -> dict[str, str]:
    """What every process of the cluster runs with: the test process's environment (PATH,
    PYTHONPATH) without any Ray setting of a local cluster, offline model hub, the cluster's
    token, and the node's own home (Ray reads ~/.ray; nothing is shared through it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_PREFIXES_DROPPED)}
    env.update(
        HOME=str(home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
    )
    return env


def in_new_node(node: NodeSpec, workdir: Path, argv: list[str]) -> list[str]:
    """``argv`` as the first process of a node: in its network namespace, in new PID and mount
    namespaces (its own /proc, and a fresh tmpfs on /tmp), in ``workdir``.

    The PID namespace matters as much as the network one: a driver finds "its" raylet by listing
    processes (``ray._private.services.find_node_ids``) and, seeing several, picks the head, so a
    driver on one node would register itself with another node's address."""
    return [
        "ip",
        "netns",
        "exec",
        node.netns,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "sh",
        "-c",
        private_tmp_script(paths_kept_through_tmp()),
        NODE_TMPFS_SIZE,
        str(workdir),
        *argv,
    ]


def paths_kept_through_tmp() -> list[Path]:
    """The code every node runs (the checkout and the Python environment) where it lives under
    /tmp, as in a CI clone there: a node's fresh /tmp would otherwise hide it."""
    tmp = Path("/tmp").resolve()
    wanted = {Path(p).resolve() for p in (Path(__file__).parents[3], sys.prefix)}
    under_tmp = sorted(p for p in wanted if p.is_relative_to(tmp) and p != tmp)
    return [p for p in under_tmp if not any(p != q and p.is_relative_to(q) for q in under_tmp)]


def private_tmp_script(kept: list[Path]) -> str:
    """A shell script (``$0`` tmpfs size, ``$1`` work directory, then the command) that mounts a
    fresh tmpfs on /tmp and binds the ``kept`` paths back into it from the old /tmp (held at
    /mnt, which only this mount namespace sees)."""
    steps = []
    if kept:
        steps.append("mount --rbind /tmp /mnt")
    steps.append('mount -t tmpfs -o size="$0" tmpfs /tmp')
    for path in kept:
        inside = path.relative_to(Path("/tmp").resolve())
        steps.append(f"mkdir -p '{path}' && mount --rbind '/mnt/{inside}' '{path}'")
    return " && ".join([*steps, 'cd "$1"', "shift", 'exec "$@"'])


def in_running_node(pid: int, workdir: Path, argv: list[str]) -> list[str]:
    """``argv`` inside the node whose first process is ``pid``: its network, mount and PID
    namespaces (its /tmp, where a driver finds the raylet's socket), in ``workdir``."""
    script = 'cd "$0" && exec "$@"'
    return [
        "nsenter",
        f"--target={pid}",
        "--net",
        "--mount",
        "--pid",
        "sh",
        "-c",
        script,
        str(workdir),
        *argv,
    ]


def first_process_of(launcher: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """The PID (as the root namespace sees it) of the process ``unshare --fork`` started."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = children.read_text().split() if children.exists() else []
        if listed:
            return int(listed[0])
        time.sleep(0.05)
    raise RuntimeError(f"the node launched by pid {launcher.pid} has no first process")


@dataclass
class Cluster:
    """The running cluster: its nodes, processes, token and addresses (``start_cluster`` makes it)."""

    head: NodeSpec
    workers: list[NodeSpec]
    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def nodes(self) -> list[NodeSpec]:
        return [self.head, *self.workers]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    def workdir(self, node: NodeSpec) -> Path:
        path = self.root / "nodes" / node.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, node: NodeSpec) -> dict[str, str]:
        return node_environment(self.token, self.workdir(node))

    def log_path(self, name: str) -> Path:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        return self.root / "logs" / f"{name}.log"

    def _ray_start(self, node: NodeSpec) -> subprocess.Popen:
        ray = str(Path(sys.executable).with_name("ray"))
        argv = [
            ray,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={node.ip}",
            f"--num-cpus={node.num_cpus:g}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--resources={json.dumps(dict(node.resources))}",
        ]
        if node is self.head:
            argv += [
                "--head",
                f"--port={GCS_PORT}",
                "--include-dashboard=true",
                "--dashboard-host=0.0.0.0",
                f"--dashboard-port={DASHBOARD_PORT}",
            ]
        else:
            argv.append(f"--address={self.gcs_address}")
        log = self.log_path(f"ray-{node.name}").open("ab")
        return subprocess.Popen(
            in_new_node(node, self.workdir(node), argv),
            env=self.env(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> None:
        self.processes[self.head.name] = self._ray_start(self.head)
        wait_for_port(self.head.ip, GCS_PORT, RAY_STARTUP_TIMEOUT_S, "the head's GCS")
        for node in self.workers:
            self.processes[node.name] = self._ray_start(node)
        self.wait_for_nodes(len(self.nodes), RAY_STARTUP_TIMEOUT_S)

    def wait_for_nodes(self, count: int, timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            try:
                alive = [n for n in self.state("nodes") if n.get("state") == "ALIVE"]
            except OSError:
                alive = []
            if len(alive) >= count:
                return alive
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(alive)} of {count} Ray nodes joined within {timeout_s:g}s")
            time.sleep(1.0)

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = self.log_path(f"ray-{name}").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"`ray start` of node {name} exited ({process.returncode}):\n{tail}")

    def api(self, path: str, timeout_s: float = 30.0) -> dict:
        """GET a dashboard endpoint with the cluster's token (as every client of the cluster must)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def state(self, kind: str, limit: int = 10000, detail: bool = True) -> list[dict]:
        """Rows of Ray's state API (``nodes``, ``actors``, ``tasks``, ...) from the dashboard."""
        body = self.api(f"/api/v0/{kind}?limit={limit}&detail={str(detail).lower()}")
        return body["data"]["result"]["result"]

    def jobs(self) -> list[dict]:
        return self.api("/api/jobs/")

    def run_in(self, node: NodeSpec, argv: list[str], timeout_s: float, name: str) -> str:
        """Run ``argv`` to completion inside ``node`` (as a driver there); its output, or the
        error with the output's tail."""
        log = self.log_path(name)
        with log.open("wb") as out:
            completed = subprocess.run(
                in_running_node(first_process_of(self.processes[node.name]), self.workdir(node), argv),
                env=self.env(node),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            )
        text = log.read_text(errors="replace")
        if completed.returncode != 0:
            raise RuntimeError(f"{name} failed in node {node.name} ({completed.returncode}):\n{text[-4000:]}")
        return text

    def collect_ray_logs(self) -> None:
        """Copy each node's Ray logs out of its private /tmp into the run directory's logs/."""
        for node, process in self.processes.items():
            if process.poll() is None:
                target = self.log_path(f"ray-{node}-session").with_suffix("")
                argv = ["cp", "-r", "/tmp/ray/session_latest/logs", str(target)]
                subprocess.run(
                    in_running_node(first_process_of(process), self.root, argv),
                    capture_output=True,
                    timeout=60,
                )

    def stop(self) -> None:
        """Stop every process of every node (the whole namespace, whatever Ray forked)."""
        for node in reversed(self.nodes):
            _kill_all_in(node.netns, STOP_GRACE_S)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)

    def log_tails(self, chars: int = 2000) -> str:
        logs = sorted((self.root / "logs").glob("*.log")) if (self.root / "logs").is_dir() else []
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


@contextlib.contextmanager
def cluster_network(head: NodeSpec, workers: list[NodeSpec], root: Path) -> Iterator[Cluster]:
    """The bridge and the nodes' namespaces, with the (not yet started) cluster; on exit every
    process of every node is stopped and the namespaces and bridge are deleted, however the body
    ended. Leftovers of a crashed earlier run are deleted first."""
    remove_leftovers()
    cluster = Cluster(head=head, workers=workers, root=root)
    try:
        create_network(cluster.nodes)
        yield cluster
    finally:
        try:
            cluster.collect_ray_logs()
            cluster.stop()
        finally:
            remove_leftovers()
