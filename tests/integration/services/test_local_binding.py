"""The local cluster listens on loopback only, and reflection does not bypass the API key.

The session's cluster is started as ``illume serve`` starts its own (``services.local``:
``local_only_ray``, ``local_runtime_env``, ``grpc_options``), so what holds here holds for a local
server: every TCP port that this process or its descendants (GCS, raylet, dashboard and its agents,
Serve's controller, proxy and replicas, idle workers) listen on is a loopback address.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import grpc
import pytest

from tests.integration.services.conftest import KEYS

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def listening_sockets(root: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket ``root`` and its descendants listen on."""
    owner = {}
    for pid in _descendants(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for inode in _socket_inodes(pid):
            owner[inode] = f"{name}[{pid}]"
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in owner:
                host, port = local.split(":")
                out.append((str(_address(host)), int(port, 16), owner[inode]))
    return sorted(set(out), key=lambda s: (s[1], s[0]))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_every_port_of_the_local_cluster_listens_on_loopback(
    sqlite_app, grpc_port, dashboard_port, metrics_port
):
    sockets = listening_sockets(os.getpid())
    ports = {port for _, port, _ in sockets}
    # Not vacuous: Serve's gRPC proxy, the dashboard and Ray's metrics export are among them.
    assert {grpc_port, dashboard_port, metrics_port} <= ports, sockets
    wide = [s for s in sockets if not is_loopback(s[0])]
    assert not wide, f"listening beyond loopback: {wide}"


def _reflection_list_services(port: int, key: str | None):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    metadata = [("authorization", f"Bearer {key}")] if key else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        return list(stub.ServerReflectionInfo(iter([request]), timeout=20, metadata=metadata))


REFUSED = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def test_reflection_without_a_key_is_refused(sqlite_app, grpc_port, admin):
    admin.server_status(timeout=30)  # the server answers authenticated calls
    with pytest.raises(grpc.RpcError) as refused:
        _reflection_list_services(grpc_port, None)
    assert refused.value.code() in REFUSED, refused.value


def test_reflection_is_off(sqlite_app, grpc_port):
    """Off for everyone: Serve would answer it on the proxy, where no key is checked."""
    with pytest.raises(grpc.RpcError) as refused:
        _reflection_list_services(grpc_port, KEYS["admin"])
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
