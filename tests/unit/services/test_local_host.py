"""`illume serve --host`: the ready line names where gRPC listens; Serve's binds follow the host."""

from __future__ import annotations

import sys
from typing import ClassVar

import pytest

import services.local as local


class _Status:
    model_id = "tiny"


class _Client:
    targets: ClassVar[list[str]] = []

    def __init__(self, target, api_key_file=None):
        self.targets.append(target)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def server_status(self, timeout):
        return _Status()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """run_forever with Ray replaced: what start got, and the client's target."""
    import illume.client

    seen = {}
    _Client.targets = []
    monkeypatch.setattr(
        local,
        "start",
        lambda config, port, cpus, host, http_port: seen.update(host=host, port=port, http_port=http_port),
    )
    monkeypatch.setattr(local, "stop", lambda: None)
    monkeypatch.setattr(local, "ensure_port_free", lambda port, name="": None)
    monkeypatch.setattr(local, "wait_until_port_free", lambda *a, **k: None)
    monkeypatch.setattr(illume.client, "IllumeClient", _Client)

    class _Stop:  # the wait for SIGTERM returns at once
        def __init__(self):
            pass

        def set(self):
            pass

        def wait(self, timeout):
            return True

    monkeypatch.setattr(local.threading, "Event", _Stop)
    config = local.local_config(tmp_path, tmp_path, None)
    return seen, config


@pytest.mark.parametrize(
    ("host", "shown", "target"),
    [
        ("127.0.0.1", "127.0.0.1:50999", "127.0.0.1:50999"),
        ("127.0.0.2", "127.0.0.2:50999", "127.0.0.2:50999"),
        ("0.0.0.0", "0.0.0.0:50999", "127.0.0.1:50999"),
        ("::", "[::]:50999", "[::1]:50999"),
    ],
)
def test_the_ready_line_names_the_address_grpc_listens_on(served, tmp_path, capsys, host, shown, target):
    seen, config = served
    assert local.run_forever(tmp_path, None, None, 50999, 2, config=config, host=host, http_port=8999) == 0
    assert seen == {"host": host, "port": 50999, "http_port": 8999}
    out = capsys.readouterr().out
    assert f"illume ready: gRPC on {shown}," in out
    assert f"web: annotation app on http://{target.rsplit(':', 1)[0]}:8999/ " in out
    assert f"--target {target} " in out
    assert _Client.targets == [target]


def test_serve_binds_follow_the_host(monkeypatch):
    """The worker setup hook: Serve's proxy binds --host, a replica's own server loopback."""
    from ray._common import tls_utils
    from ray.serve._private import default_impl

    class Server:
        def __init__(self):
            self.bound = []

        def add_insecure_port(self, address):
            self.bound.append(address)
            return 1

    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)
    monkeypatch.setattr(
        tls_utils, "add_port_to_grpc_server", lambda server, address: server.add_insecure_port(address)
    )
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:  # the hook patches it too; restored after the test
        monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    monkeypatch.setenv(local.GRPC_HOST_ENV, "127.0.0.2")
    local.bind_serve_servers()
    proxy, replica = Server(), Server()
    default_impl.add_grpc_address(proxy, "[::]:50999")
    tls_utils.add_port_to_grpc_server(replica, "[::]:0")
    assert proxy.bound == ["127.0.0.2:50999"]
    assert replica.bound == ["127.0.0.1:0"]


def test_reflection_is_off_in_the_proxy_options():
    options = local.grpc_options(50999)
    assert options.enable_reflection is False and options.port == 50999
