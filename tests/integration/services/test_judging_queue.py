"""The judging queue over the real gRPC server (docs/SERVING.md, "The judging queue"): NextItem
leases items to one annotator at a time and never hands one twice, GetImage serves only the
namespace's images, WhoAmI names the key, and AddPoolItems stores uploaded items that NextItem
generates on demand (logged like client traffic), refusing a bad batch whole.
"""

from __future__ import annotations

import hashlib
import uuid

import grpc
import pytest

from illume.store import FeedbackStore

from .conftest import client_for, png


@pytest.fixture
def namespace(sqlite_app, grpc_port) -> str:
    name = f"queue-{uuid.uuid4().hex[:8]}"
    with client_for(grpc_port, "admin") as admin:
        admin.declare_namespace(name)
    return name


def generate(admin, namespace: str, colour: str) -> str:
    reply = admin.generate(
        png(colour),
        f"what colour is this {colour} square?",
        colour,
        n=3,
        max_new_tokens=4,
        namespace=namespace,
    )
    return reply.generation_id


def test_next_item_leases_to_one_annotator_and_never_twice(sqlite_app, grpc_port, namespace):
    with client_for(grpc_port, "admin") as admin, client_for(grpc_port, "annotator") as annotator:
        generated = {generate(admin, namespace, c) for c in ("red", "green")}
        first = annotator.next_item(namespace)
        second = admin.next_item(namespace)  # another principal
        assert first.has_item and second.has_item
        handed = {first.generation.generation_id, second.generation.generation_id}
        assert handed == generated
        assert first.reason in ("active", "random") and first.lease_expires_at
        assert len(first.generation.candidates) >= 1 and not first.generation.judgements
        # Both leased, neither judged: nothing for anyone, and never the same item again.
        assert not annotator.next_item(namespace).has_item
        annotator.submit_feedback(first.generation.generation_id, skipped=True, namespace=namespace)
        assert not annotator.next_item(namespace).has_item
        image = annotator.get_image(first.generation.image_sha256, namespace)
        assert hashlib.sha256(image).hexdigest() == first.generation.image_sha256
        with pytest.raises(grpc.RpcError) as refused:
            annotator.get_image(first.generation.image_sha256, "default")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as bad:
            annotator.next_item(namespace, selection="greedy")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with client_for(grpc_port, "client") as client, pytest.raises(grpc.RpcError) as denied:
        client.next_item(namespace)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_who_am_i_names_the_key(sqlite_app, grpc_port):
    with client_for(grpc_port, "annotator") as annotator:
        me = annotator.who_am_i()
    assert (me.principal, me.role) == ("test-annotator", "annotator")
    assert "default" in me.namespaces and len(me.key_id) == 8


def test_pool_items_are_generated_when_handed_out(sqlite_app, grpc_port, namespace):
    store = FeedbackStore(sqlite_app.feedback_log.store)
    try:
        with client_for(grpc_port, "admin") as admin, client_for(grpc_port, "annotator") as annotator:
            items = [(png("blue"), "what colour is it?", "blue"), (png("blue"), "what colour is it?", "")]
            reply = admin.add_pool_items(items, namespace=namespace)
            assert (reply.added, reply.already_present, reply.pending) == (1, 1, 1)
            with pytest.raises(grpc.RpcError) as bad:
                admin.add_pool_items(
                    [(png("white"), "a good one?", ""), (b"not an image", "a bad one?", "")],
                    namespace=namespace,
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "pool item 1" in bad.value.details()
            # Its image is the namespace's as soon as it is in the pool (a page shows it before judging).
            sha = hashlib.sha256(png("blue")).hexdigest()
            assert annotator.get_image(sha, namespace) == png("blue")
            with pytest.raises(grpc.RpcError) as denied:
                annotator.add_pool_items(items, namespace=namespace)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            handed = annotator.next_item(namespace)
        assert handed.has_item and handed.reason == "pool"
        assert handed.generation.answer == "blue" and not handed.generation.answer_generated
        assert handed.generation.adapter_version == "base"  # no production adapter in this namespace
        assert len(handed.generation.candidates) >= 1
        stored = store.get_generation(handed.generation.generation_id, namespace)
        assert stored.client_request_id.startswith("pool:") and stored.image_sha256 == sha
        assert store.stats(namespace).generations == 1  # the bad batch stored nothing
    finally:
        store.close()
