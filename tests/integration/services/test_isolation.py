"""Tenant isolation over the real gRPC server (docs/SERVING.md, "Namespaces").

The matrix: every RPC x (tenant-a: the scoped keys' own namespace, tenant-b: another declared
namespace, an undeclared name) x (client, annotator and admin of tenant-a, the admin of tenant-b, an
admin allowed all namespaces), with the expected status code in ``MATRIX``. Then: nothing of
another tenant was returned, counted or changed; an annotator cannot submit under another id; a
revoked key fails within one reload interval; a rotated key works without a restart.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from illume.client import IllumeClient
from illume.store import AdapterRegistry, FeedbackStore

from .conftest import KEYS, KEYS_RELOAD_S, SCOPED_KEYS, TENANT_A, TENANT_B, png, write_keys_file

UNDECLARED = "nowhere"
TARGETS = (TENANT_A, TENANT_B, UNDECLARED)
CALLERS = ("client-a", "annotator-a", "admin-a", "admin-b", "admin-all")
CODES = {
    "OK": grpc.StatusCode.OK,
    "PD": grpc.StatusCode.PERMISSION_DENIED,
    "NF": grpc.StatusCode.NOT_FOUND,
    "FP": grpc.StatusCode.FAILED_PRECONDITION,
}
# Each cell: the codes for (tenant-a, tenant-b, undeclared). FP: the call passed the namespace
# guard and failed on its own precondition (promote a rejected version, nothing to roll back,
# tuning disabled), which keeps these admin calls from changing what replicas serve.
MATRIX = {
    #                     client-a    annotator-a admin-a     admin-b     admin-all
    "Generate": ("OK PD PD", "OK PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "GenerateStream": ("OK PD PD", "OK PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "SubmitFeedback": ("PD PD PD", "OK PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "GetGeneration": ("PD PD PD", "OK PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    # The judging queue: before AddPoolItems, so that no pool item gets generated in a tenant.
    "NextItem": ("PD PD PD", "OK PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "GetImage": ("PD PD PD", "OK PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "GetFeedbackStats": ("PD PD PD", "OK PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "ExportFeedback": ("PD PD PD", "PD PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "ListAdapters": ("PD PD PD", "PD PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "GetAdapter": ("PD PD PD", "PD PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "PromoteAdapter": ("PD PD PD", "PD PD PD", "FP PD PD", "PD FP PD", "FP FP NF"),
    "RollbackAdapter": ("PD PD PD", "PD PD PD", "FP PD PD", "PD FP PD", "FP FP NF"),
    "StartTuningRound": ("PD PD PD", "PD PD PD", "FP PD PD", "PD FP PD", "FP FP NF"),
    # No namespace field: the round of tenant-a, of tenant-b, an id that does not exist. A round
    # the key may not see is NOT_FOUND, like an absent one.
    "GetTuningRound": ("PD PD PD", "PD PD PD", "OK NF NF", "NF OK NF", "OK OK NF"),
    "ListTuningRounds": ("PD PD PD", "PD PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "ListAuditEvents": ("PD PD PD", "PD PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    "ListAnnotators": ("PD PD PD", "PD PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    # Nobody is flagged in these namespaces: past the guard the clear is NOT_FOUND.
    "ClearAnnotatorFlag": ("PD PD PD", "PD PD PD", "NF PD PD", "PD NF PD", "NF NF NF"),
    "AddPoolItems": ("PD PD PD", "PD PD PD", "OK PD PD", "PD OK PD", "OK OK NF"),
    # No namespace field: every key gets its own view (checked below).
    "GetServerStatus": ("OK OK OK", "OK OK OK", "OK OK OK", "OK OK OK", "OK OK OK"),
    "ListNamespaces": ("OK OK OK", "OK OK OK", "OK OK OK", "OK OK OK", "OK OK OK"),
    "WhoAmI": ("OK OK OK", "OK OK OK", "OK OK OK", "OK OK OK", "OK OK OK"),
    # Declaring needs an admin allowed all namespaces; run last (the undeclared cell declares a
    # fresh name, so the other cells' undeclared name stays undeclared).
    "DeclareNamespace": ("PD PD PD", "PD PD PD", "PD PD PD", "PD PD PD", "OK OK OK"),
}


def key_of(caller: str) -> str:
    return KEYS["admin"] if caller == "admin-all" else SCOPED_KEYS[caller][0]


@pytest.fixture(scope="module")
def world(sqlite_app, grpc_port):
    """Per tenant: one logged generation, one rejected adapter version and one pending round."""
    registry = AdapterRegistry.open(sqlite_app.feedback_log.store)
    data = {}
    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=KEYS["admin"]) as admin:
        for ns in (TENANT_A, TENANT_B):
            generation = admin.generate(
                png("green"), f"what is in {ns}?", "grass", n=1, max_new_tokens=2, namespace=ns
            )
            version = registry.register(ns, "file:///nowhere", {"test": "isolation"}).version
            registry.mark_rejected(ns, version, "isolation test")
            data[ns] = {
                "generation": generation.generation_id,
                "version": str(version),
                "round": registry.create_round(ns).round_id,
            }
    data[UNDECLARED] = {"generation": data[TENANT_A]["generation"], "version": "1", "round": uuid.uuid4().hex}
    yield data
    registry.close()


def _request(client: IllumeClient, rpc: str, ns: str, world: dict):
    """A call of ``rpc`` on namespace ``ns``, as cheap as the RPC allows."""
    ids = world[ns]
    calls = {
        "Generate": lambda: client.generate(
            png("green"), "what?", "grass", n=1, max_new_tokens=2, namespace=ns, ephemeral=True, timeout=60
        ),
        "GenerateStream": lambda: list(
            client.generate_stream(
                png("green"),
                "what?",
                "grass",
                n=1,
                max_new_tokens=2,
                namespace=ns,
                ephemeral=True,
                timeout=60,
            )
        ),
        "SubmitFeedback": lambda: client.submit_feedback(
            ids["generation"], skipped=True, idempotency_key=uuid.uuid4().hex, namespace=ns
        ),
        "GetGeneration": lambda: client.get_generation(ids["generation"], ns),
        "GetFeedbackStats": lambda: client.stats(ns),
        "ExportFeedback": lambda: list(client.export("sft", ns, include_held_out=True)),
        "ListAdapters": lambda: client.list_adapters(ns),
        "GetAdapter": lambda: client.get_adapter(ids["version"], ns),
        "PromoteAdapter": lambda: client.promote(ids["version"], namespace=ns),
        "RollbackAdapter": lambda: client.rollback(ns),
        "StartTuningRound": lambda: client.start_round(ns, force=True),
        "GetTuningRound": lambda: client.get_round(ids["round"]),
        "ListTuningRounds": lambda: client.list_rounds(ns),
        "ListAuditEvents": lambda: client.list_audit_events(ns),
        "ListAnnotators": lambda: client.list_annotators(ns),
        "ClearAnnotatorFlag": lambda: client.clear_annotator_flag(ns, "nobody-flagged"),
        "NextItem": lambda: client.next_item(ns),
        # The fixture's image is in both tenants: the namespace decides, not the hash.
        "GetImage": lambda: client.get_image(hashlib.sha256(png("green")).hexdigest(), ns),
        "AddPoolItems": lambda: client.add_pool_items(
            [(png("red"), f"pool question {ns}?", "")], namespace=ns
        ),
        "WhoAmI": lambda: client.who_am_i(),
        "GetServerStatus": lambda: client.server_status(),
        "ListNamespaces": lambda: client.list_namespaces(),
        "DeclareNamespace": lambda: client.declare_namespace(
            f"declared-{uuid.uuid4().hex[:8]}" if ns == UNDECLARED else ns
        ),
    }
    return calls[rpc]()


def _namespaces_in(reply) -> set[str]:
    """Every namespace a reply names (recursively), to check nothing of another tenant comes back."""
    found: set[str] = set()
    replies = reply if isinstance(reply, list) else [reply]
    for message in replies:
        if hasattr(message, "ListFields"):
            for field, value in message.ListFields():
                names_namespace = field.name == "namespace" or (
                    field.containing_type.name == "Namespace" and field.name == "name"
                )
                if names_namespace and isinstance(value, str):
                    found.add(value)
                elif field.message_type is not None:
                    items = value if isinstance(value, Sequence) else [value]
                    for item in items:
                        found |= _namespaces_in(item)
        if hasattr(message, "json_row") and message.json_row:
            row = json.loads(message.json_row)
            if "namespace" in row:
                found.add(row["namespace"])
    return found


def test_isolation_matrix(sqlite_app, grpc_port, world):
    allowed = {
        "client-a": {TENANT_A},
        "annotator-a": {TENANT_A},
        "admin-a": {TENANT_A},
        "admin-b": {TENANT_B},
    }
    failures = []
    for rpc, row in MATRIX.items():  # DeclareNamespace last
        for caller, cell in zip(CALLERS, row, strict=True):
            with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=key_of(caller), retries=0) as client:
                for ns, expected in zip(TARGETS, cell.split(), strict=True):
                    try:
                        reply, code = _request(client, rpc, ns, world), grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        reply, code = None, exc.code()
                    if code != CODES[expected]:
                        failures.append(f"{rpc} by {caller} on {ns}: {code.name}, expected {expected}")
                    if reply is not None and caller in allowed:
                        leaked = _namespaces_in(reply) - allowed[caller]
                        if leaked:
                            failures.append(f"{rpc} by {caller} on {ns} returned namespaces {sorted(leaked)}")
    assert not failures, "\n".join(failures)


def test_nothing_of_another_tenant_was_changed_or_counted(sqlite_app, world):
    """After the matrix: tenant-b holds only what its own keys (and the all-namespace admin) did."""
    registry = AdapterRegistry.open(sqlite_app.feedback_log.store)
    store = FeedbackStore(sqlite_app.feedback_log.store)
    try:
        stats = store.stats(TENANT_B)
        assert stats.generations == 1  # the fixture's: no tenant-a generation is counted here
        judges = {
            j.annotator_id for j in store.get_generation(world[TENANT_B]["generation"], TENANT_B).judgements
        }
        assert judges <= {"admin-b", "test-admin"}, judges
        adapter = registry.get(TENANT_B, world[TENANT_B]["version"])
        assert adapter.state == "rejected" and adapter.aliases == ()
        rounds, _ = registry.list_rounds(TENANT_B)
        assert [r.round_id for r in rounds] == [world[TENANT_B]["round"]] and rounds[0].state == "pending"
        events, _ = registry.list_audit([TENANT_B], include_system=False)
        assert {e.principal for e in events} <= {"admin-b", "test-admin", "system:config"}
        assert not registry.is_declared(UNDECLARED)
    finally:
        registry.close()
        store.close()


def test_an_annotator_cannot_submit_under_another_id(sqlite_app, grpc_port, world):
    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=key_of("annotator-a")) as annotator:
        with pytest.raises(grpc.RpcError) as info:
            annotator.submit_feedback(
                world[TENANT_A]["generation"], skipped=True, annotator_id="someone-else", namespace=TENANT_A
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        mine = annotator.submit_feedback(
            world[TENANT_A]["generation"], skipped=True, annotator_id="annotator-a", namespace=TENANT_A
        )
        assert mine.feedback_id
        judgements = annotator.get_generation(world[TENANT_A]["generation"], TENANT_A).judgements
        assert "someone-else" not in {j.annotator_id for j in judgements}


def test_on_behalf_submission_is_audited(sqlite_app, grpc_port, world):
    """The fixture's annotator key holds submit_on_behalf (a labelling tool's key)."""
    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=KEYS["annotator"]) as tool:
        tool.submit_feedback(
            world[TENANT_A]["generation"], skipped=True, annotator_id="vendor-7", namespace=TENANT_A
        )
        assert "vendor-7" in {
            j.annotator_id for j in tool.get_generation(world[TENANT_A]["generation"], TENANT_A).judgements
        }
    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=key_of("admin-a")) as admin:
        events = admin.list_audit_events(TENANT_A).events
    on_behalf = [e for e in events if e.action == "feedback.submit_on_behalf"]
    assert on_behalf and on_behalf[0].principal == "test-annotator"
    assert json.loads(on_behalf[0].arguments_json)["annotator_id"] == "vendor-7"
    assert len(on_behalf[0].key_id) == 8 and KEYS["annotator"] not in on_behalf[0].arguments_json


def _wait_code(client: IllumeClient, expected: grpc.StatusCode, limit_s: float) -> float:
    """Seconds until ListNamespaces answers ``expected`` (fails after ``limit_s``)."""
    started = time.monotonic()
    while True:
        try:
            client.list_namespaces(timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        elapsed = time.monotonic() - started
        if code == expected:
            return elapsed
        assert elapsed < limit_s, f"still {code.name} after {elapsed:.1f} s"
        time.sleep(0.1)


def test_revoked_key_fails_and_rotated_key_works_without_a_restart(sqlite_app, grpc_port, admin):
    keys_file = Path(sqlite_app.auth.keys_file)
    old, new = f"rotating-old-{uuid.uuid4().hex}", f"rotating-new-{uuid.uuid4().hex}"
    # Slack for the call that notices the change: one interval plus the calls' own latency.
    limit = KEYS_RELOAD_S + 2.0
    with (
        IllumeClient(f"127.0.0.1:{grpc_port}", api_key=old, retries=0) as old_client,
        IllumeClient(f"127.0.0.1:{grpc_port}", api_key=new, retries=0) as new_client,
    ):
        write_keys_file(keys_file, {"app-rotating": old})
        _wait_code(old_client, grpc.StatusCode.OK, limit)
        # Rotate: add the new key beside the old one.
        write_keys_file(keys_file, {"app-rotating": old, "app-rotating-2": new})
        _wait_code(new_client, grpc.StatusCode.OK, limit)
        assert [n.name for n in new_client.list_namespaces().namespaces] == [TENANT_A]
        # Revoke the old key: it fails within one reload interval; the new one keeps working.
        write_keys_file(keys_file, {"app-rotating-2": new})
        elapsed = _wait_code(old_client, grpc.StatusCode.UNAUTHENTICATED, limit)
        assert elapsed <= limit
        new_client.list_namespaces()
    events = admin.list_audit_events().events
    reloads = [json.loads(e.arguments_json) for e in events if e.action == "keys.reload"]
    assert reloads and all(old not in json.dumps(r) and new not in json.dumps(r) for r in reloads)
