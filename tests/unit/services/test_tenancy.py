"""Keys, namespaces and caller identity without Ray: the Authenticator (legacy key files, reload,
revoke, rotate), the servicers' namespace guard and on-behalf feedback, driven with fakes of the
deployment handles and a real registry on SQLite. The real gRPC server's matrix is
tests/integration/services/test_isolation.py."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from illume.store import AdapterRegistry
from illume.store import schema as s
from illume.store.settings import StoreSettings
from illume.store.types import Actor, FeedbackReceipt
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits
from services import metrics
from services.auth import Authenticator, Caller, key_id_of, key_sha256
from services.config import ApiKey, AuthSettings
from services.servicers.admin import AdminServicer
from services.servicers.base import DeclaredNamespaces, StreamAborted
from services.servicers.feedback import FeedbackServicer
from services.servicers.rationale import RationaleServicer


def entry(key: str, role: str, principal: str, **extra: Any) -> dict[str, Any]:
    return {"sha256": key_sha256(key), "role": role, "principal": principal, **extra}


# -- keys -----------------------------------------------------------------------------------------


def test_a_key_file_without_namespaces_still_loads_as_all_namespaces_with_a_warning(tmp_path, caplog):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([entry("old-key", "client", "legacy-app")]))  # the pre-scoping format
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        auth = Authenticator(AuthSettings(keys_file=path))
    caller = auth.authenticate([("authorization", "Bearer old-key")])
    assert caller.all_namespaces and caller.may_use("anything") and caller.permissions == frozenset()
    assert caller.key_id == key_sha256("old-key")[:8]
    assert "has no 'namespaces' list" in caplog.text and caller.key_id in caplog.text
    assert "old-key" not in caplog.text  # a key is never logged, only its id


def test_scoped_caller():
    key = ApiKey(sha256=key_sha256("k"), role="annotator", principal="ann", namespaces=["a", "b"])
    caller = Caller.of(key)
    assert caller.may_use("a") and caller.may_use("b") and not caller.may_use("c")
    assert not caller.all_namespaces and not caller.may_submit_on_behalf
    star = Caller.of(key.model_copy(update={"namespaces": ["*"], "permissions": ["submit_on_behalf"]}))
    assert star.all_namespaces and star.may_use("c") and star.may_submit_on_behalf


def test_unknown_permission_is_refused():
    with pytest.raises(ValueError):
        ApiKey(sha256=key_sha256("k"), role="admin", principal="p", permissions=["everything"])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _status(auth: Authenticator, key: str) -> str:
    try:
        auth.authenticate([("authorization", f"Bearer {key}")])
        return "OK"
    except Exception as exc:
        return exc.code  # type: ignore[attr-defined]


def test_revoke_and_rotate_take_effect_after_one_reload_interval(tmp_path, caplog):
    path, clock, events = tmp_path / "keys.json", Clock(), []
    path.write_text(json.dumps([entry("key-v1", "annotator", "ann", namespaces=["a"])]))
    auth = Authenticator(AuthSettings(keys_file=path, reload_interval_s=5), events.append, clock)
    assert _status(auth, "key-v1") == "OK" and _status(auth, "key-v2") == "UNAUTHENTICATED"

    # Rotate: the new key is added beside the old one; both work after the next check.
    path.write_text(
        json.dumps([entry(k, "annotator", "ann", namespaces=["a"]) for k in ("key-v1", "key-v2")])
    )
    clock.now = 4.9
    assert _status(auth, "key-v2") == "UNAUTHENTICATED"  # not checked yet
    clock.now = 5.0
    assert _status(auth, "key-v2") == "OK" and _status(auth, "key-v1") == "OK"

    # Revoke the old key.
    path.write_text(json.dumps([entry("key-v2", "annotator", "ann", namespaces=["a"])]))
    clock.now = 10.0
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert _status(auth, "key-v1") == "UNAUTHENTICATED"
    assert _status(auth, "key-v2") == "OK"
    assert [e["added"] for e in events] == [[key_id_of(key_sha256("key-v2"))], []]
    assert events[1]["removed"] == [key_id_of(key_sha256("key-v1"))]
    assert "key-v1" not in caplog.text and "key-v1" not in json.dumps(events)

    # A broken file keeps the keys loaded (reported once), and a fixed one loads.
    path.write_text("[{not json")
    clock.now = 15.0
    assert _status(auth, "key-v2") == "OK"
    path.write_text(json.dumps([entry("key-v3", "admin", "ops", namespaces=["*"])]))
    clock.now = 20.0
    assert _status(auth, "key-v3") == "OK" and _status(auth, "key-v2") == "UNAUTHENTICATED"


# -- the servicers' guard ---------------------------------------------------------------------


class Remote:
    """A fake deployment method: ``.remote(...)`` records the call and answers ``reply``."""

    def __init__(self, calls: list, name: str, reply: Any) -> None:
        self.calls, self.name, self.reply = calls, name, reply

    async def remote(self, *args: Any) -> Any:
        self.calls.append((self.name, args))
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply(*args) if callable(self.reply) else self.reply


class Backend:
    def __init__(self, **methods: Any) -> None:
        self.calls: list = []
        for name, reply in methods.items():
            setattr(self, name, Remote(self.calls, name, reply))


class Ctx:
    def __init__(self, key: str) -> None:
        self.metadata = [("authorization", f"Bearer {key}")]
        self.code: grpc.StatusCode | None = None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details) -> None:
        self.details = details


class Servicer(RationaleServicer, FeedbackServicer, AdminServicer):
    pass


KEYS = {
    "client-a": entry("client-a", "client", "app-a", namespaces=["tenant-a"]),
    "annotator-a": entry("annotator-a", "annotator", "ann-a", namespaces=["tenant-a"]),
    "proxy-a": entry(
        "proxy-a", "annotator", "tool-a", namespaces=["tenant-a"], permissions=["submit_on_behalf"]
    ),
    "admin-a": entry("admin-a", "admin", "ops-a", namespaces=["tenant-a"]),
    "admin-b": entry("admin-b", "admin", "ops-b", namespaces=["tenant-b"]),
    "admin-all": entry("admin-all", "admin", "ops", namespaces=["*"]),
}


def tenant_servicer(settings: StoreSettings, keys: dict[str, dict], feedback_log: Backend) -> Servicer:
    """The servicers over a real registry with tenant-a and tenant-b declared, ``keys`` (entries as
    ``entry`` makes them) and ``feedback_log`` standing in for the deployment."""
    registry = AdapterRegistry(s.create_store_engine(settings))
    for name in ("tenant-a", "tenant-b"):
        registry.declare_namespace(name, Actor("test"))
    svc = Servicer()
    svc.auth = Authenticator(AuthSettings(keys=[ApiKey.model_validate(k) for k in keys.values()]))
    svc.limits = RequestLimits()
    svc.registry = registry
    svc.declared = DeclaredNamespaces(registry.declared_namespaces, 0.0)
    svc.feedback_log = feedback_log
    svc.generator = Backend()
    svc.loop_controller = None
    return svc


@pytest.fixture
def servicer(tmp_path: Path, monkeypatch) -> Servicer:
    monkeypatch.setattr(metrics, "record_request", lambda *a: None)
    settings = StoreSettings(url=f"sqlite:///{tmp_path}/f.db", image_dir=tmp_path / "img")
    feedback_log = Backend(
        submit_feedback=lambda sub: FeedbackReceipt(feedback_id="f1", duplicate=False, revision=1),
        stats=RuntimeError("not reached in these tests"),
    )
    return tenant_servicer(settings, KEYS, feedback_log)


def audited(svc: Servicer, *args: Any) -> list:
    """Audit events other than the fixture's own declarations."""
    return [e for e in svc.registry.list_audit(*args)[0] if e.principal != "test"]


def call(svc: Servicer, rpc: str, request: Any, key: str) -> tuple[grpc.StatusCode, Any]:
    ctx = Ctx(key)
    method = getattr(svc, rpc)

    async def run() -> Any:
        result = method(request, ctx)
        if hasattr(result, "__aiter__"):
            try:
                return [m async for m in result]
            except StreamAborted:
                return None
        return await result

    reply = asyncio.run(run())
    return ctx.code or grpc.StatusCode.OK, reply


def feedback(annotator_id: str = "", namespace: str = "tenant-a") -> pb.SubmitFeedbackRequest:
    return pb.SubmitFeedbackRequest(
        generation_id="g1",
        verdict=pb.VERDICT_SKIPPED,
        idempotency_key="k1",
        annotator_id=annotator_id,
        namespace=namespace,
    )


def test_an_annotator_cannot_submit_under_another_id(servicer: Servicer):
    code, _ = call(servicer, "SubmitFeedback", feedback("someone-else"), "annotator-a")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert servicer.feedback_log.calls == []  # nothing reached the store
    # Admin role alone is no grant either: on-behalf needs the explicit permission.
    code, _ = call(servicer, "SubmitFeedback", feedback("someone-else"), "admin-all")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    for annotator_id in ("", "ann-a"):  # empty or the key's own principal
        code, _ = call(servicer, "SubmitFeedback", feedback(annotator_id), "annotator-a")
        assert code == grpc.StatusCode.OK
    recorded = [args[0].annotator_id for _, args in servicer.feedback_log.calls]
    assert recorded == ["ann-a", "ann-a"]
    assert audited(servicer) == []


def test_on_behalf_submission_needs_the_permission_and_is_audited(servicer: Servicer):
    code, _ = call(servicer, "SubmitFeedback", feedback("vendor-annotator-7"), "proxy-a")
    assert code == grpc.StatusCode.OK
    (_, (submission,)) = servicer.feedback_log.calls[0]
    assert submission.annotator_id == "vendor-annotator-7"
    (event,) = audited(servicer, ["tenant-a"], False)
    assert (event.action, event.principal, event.key_id, event.namespace) == (
        "feedback.submit_on_behalf",
        "tool-a",
        key_id_of(key_sha256("proxy-a")),
        "tenant-a",
    )
    assert dict(event.arguments) == {
        "annotator_id": "vendor-annotator-7",
        "generation_id": "g1",
        "idempotency_key": "k1",
    }
    # The permission does not widen the key's namespaces.
    code, _ = call(servicer, "SubmitFeedback", feedback("x", namespace="tenant-b"), "proxy-a")
    assert code == grpc.StatusCode.PERMISSION_DENIED


def _requests(namespace: str) -> dict[str, Any]:
    """One request of every RPC that names a namespace."""
    return {
        "Generate": pb.GenerateRequest(namespace=namespace, question="q?"),
        "GenerateStream": pb.GenerateRequest(namespace=namespace, question="q?"),
        "SubmitFeedback": feedback(namespace=namespace),
        "GetGeneration": pb.GetGenerationRequest(generation_id="g1", namespace=namespace),
        "GetFeedbackStats": pb.GetFeedbackStatsRequest(namespace=namespace),
        "ExportFeedback": pb.ExportFeedbackRequest(namespace=namespace, format=pb.EXPORT_FORMAT_SFT),
        "ListAdapters": pb.ListAdaptersRequest(namespace=namespace),
        "GetAdapter": pb.GetAdapterRequest(namespace=namespace, adapter="1"),
        "PromoteAdapter": pb.PromoteAdapterRequest(namespace=namespace, adapter="1"),
        "RollbackAdapter": pb.RollbackAdapterRequest(namespace=namespace),
        "StartTuningRound": pb.StartTuningRoundRequest(namespace=namespace),
        "ListTuningRounds": pb.ListTuningRoundsRequest(namespace=namespace),
        "ListAuditEvents": pb.ListAuditEventsRequest(namespace=namespace),
        "ListAnnotators": pb.ListAnnotatorsRequest(namespace=namespace),
        "ClearAnnotatorFlag": pb.ClearAnnotatorFlagRequest(namespace=namespace, annotator_id="ann-a"),
        "NextItem": pb.NextItemRequest(namespace=namespace),
        "GetImage": pb.GetImageRequest(namespace=namespace, image_sha256="0" * 64),
        "AddPoolItems": pb.AddPoolItemsRequest(
            namespace=namespace, items=[pb.PoolItem(image=b"x", question="q?")]
        ),
    }


def test_every_rpc_without_a_namespace_field_is_known():
    """A new RPC whose request has no namespace must be added here on purpose (and filter itself)."""
    no_namespace = set()
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            if "namespace" not in method.input_type.fields_by_name:
                no_namespace.add(method.name)
    assert no_namespace == {"GetServerStatus", "GetTuningRound", "ListNamespaces", "WhoAmI"}
    named = {m.name for svc in pb.DESCRIPTOR.services_by_name.values() for m in svc.methods} - no_namespace
    assert named == set(_requests("x")) | {"DeclareNamespace"}


@pytest.mark.parametrize("rpc", sorted(_requests("x")))
def test_the_guard_runs_before_the_method(servicer: Servicer, rpc: str):
    for key, namespace, expected in [
        ("admin-a", "tenant-b", grpc.StatusCode.PERMISSION_DENIED),  # declared, not the key's
        ("admin-a", "nowhere", grpc.StatusCode.PERMISSION_DENIED),  # undeclared: the same answer
        ("admin-b", "tenant-a", grpc.StatusCode.PERMISSION_DENIED),
        ("admin-all", "nowhere", grpc.StatusCode.NOT_FOUND),  # undeclared, to a key allowed all
    ]:
        code, _ = call(servicer, rpc, _requests(namespace)[rpc], key)
        assert code == expected, (rpc, key, namespace, code)
    assert servicer.feedback_log.calls == [] and servicer.generator.calls == []
    assert audited(servicer) == []


def test_get_tuning_round_of_another_namespace_is_not_found(servicer: Servicer):
    round_b = servicer.registry.create_round("tenant-b")
    request = pb.GetTuningRoundRequest(round_id=round_b.round_id)
    assert call(servicer, "GetTuningRound", request, "admin-b")[0] == grpc.StatusCode.OK
    code, reply = call(servicer, "GetTuningRound", request, "admin-a")
    assert code == grpc.StatusCode.NOT_FOUND and reply.round_id == ""
    absent = pb.GetTuningRoundRequest(round_id="0" * 32)
    assert call(servicer, "GetTuningRound", absent, "admin-a")[0] == grpc.StatusCode.NOT_FOUND


def test_namespaces_are_listed_per_key_and_declared_only_by_an_all_namespace_admin(servicer: Servicer):
    names = {
        key: [n.name for n in call(servicer, "ListNamespaces", pb.ListNamespacesRequest(), key)[1].namespaces]
        for key in ("client-a", "admin-b", "admin-all")
    }
    assert names == {
        "client-a": ["tenant-a"],
        "admin-b": ["tenant-b"],
        "admin-all": ["default", "tenant-a", "tenant-b"],
    }
    declare = pb.DeclareNamespaceRequest(namespace="tenant-c")
    assert call(servicer, "DeclareNamespace", declare, "admin-a")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert (
        call(servicer, "ListAdapters", pb.ListAdaptersRequest(namespace="tenant-c"), "admin-all")[0]
        == grpc.StatusCode.NOT_FOUND
    )
    code, reply = call(servicer, "DeclareNamespace", declare, "admin-all")
    assert code == grpc.StatusCode.OK and reply.declared_by == "ops"
    assert (
        call(servicer, "ListAdapters", pb.ListAdaptersRequest(namespace="tenant-c"), "admin-all")[0]
        == grpc.StatusCode.OK
    )
    events = call(servicer, "ListAuditEvents", pb.ListAuditEventsRequest(), "admin-all")[1].events
    assert (events[0].action, events[0].principal, events[0].namespace) == (
        "namespace.declare",
        "ops",
        "tenant-c",
    )
    scoped = call(servicer, "ListAuditEvents", pb.ListAuditEventsRequest(), "admin-a")[1].events
    assert {e.namespace for e in scoped} <= {"tenant-a"}
