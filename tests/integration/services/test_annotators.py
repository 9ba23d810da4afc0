"""Annotator reliability over the real gRPC server (docs/SERVING.md, "Ratings, corrections and
annotator reliability"): three annotators judge the same generations through SubmitFeedback (the
annotator key submits on their behalf, as a labelling tool does), ListAnnotators counts them and
shows a flag set in the store, ClearAnnotatorFlag clears it (audited) and then answers NOT_FOUND,
and neither call is open to a client key. No tuning round runs: the flag is set directly, as the
tuning job would set it (tests/unit/services/test_annotators.py covers the job's side).
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from illume.store import FeedbackStore

from .conftest import client_for, png

ANNOTATORS = ("ann-1", "ann-2", "ann-3")
GENERATIONS = 6
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


@pytest.fixture(scope="module")
def judged(sqlite_app, grpc_port) -> tuple[str, int]:
    """A fresh namespace whose generations every annotator of ``ANNOTATORS`` judged, and how many
    of them are outside the held-out split (the agreement reads only those)."""
    namespace = f"annotators-{uuid.uuid4().hex[:8]}"
    with client_for(grpc_port, "admin") as admin, client_for(grpc_port, "annotator") as tool:
        admin.declare_namespace(namespace)
        trained_on = 0
        for k, colour in enumerate(COLOURS[:GENERATIONS]):
            generation = admin.generate(
                png(colour),
                f"what colour is {k}?",
                colour,
                n=2,
                max_new_tokens=3,
                min_new_tokens=1,
                namespace=namespace,
            )
            first = generation.candidates[0].candidate_id
            trained_on += not generation.held_out
            for annotator in ANNOTATORS:
                if annotator == "ann-3" and k % 2 == 0:
                    tool.submit_feedback(
                        generation.generation_id, none_fit=True, annotator_id=annotator, namespace=namespace
                    )
                else:
                    tool.submit_feedback(
                        generation.generation_id, fitting=[first], annotator_id=annotator, namespace=namespace
                    )
    return namespace, trained_on


def test_list_annotators_counts_every_annotator(judged, grpc_port):
    namespace, trained_on = judged
    with client_for(grpc_port, "admin") as admin:
        reply = admin.list_annotators(namespace)
    assert [a.annotator_id for a in reply.annotators] == list(ANNOTATORS)
    assert all(a.judgements == GENERATIONS and a.overlap_items == trained_on for a in reply.annotators)
    assert not any(a.flagged or a.below_threshold for a in reply.annotators)  # too few items to flag
    assert reply.min_overlap_items > 0 and reply.min_annotators >= 2


def test_a_stored_flag_is_listed_and_cleared_once(judged, sqlite_app, grpc_port):
    judged, _ = judged
    with FeedbackStore(sqlite_app.feedback_log.store) as store:
        store.flag_annotator(judged, "ann-3", reason="manual test flag", kappa=0.05, flagged_by="test")
    with client_for(grpc_port, "admin") as admin:
        rows = {a.annotator_id: a for a in admin.list_annotators(judged).annotators}
        assert rows["ann-3"].flagged and rows["ann-3"].flag_reason == "manual test flag"
        assert rows["ann-3"].flagged_at and not rows["ann-1"].flagged

        reply = admin.clear_annotator_flag(judged, "ann-3")
        assert reply.cleared and reply.annotator_id == "ann-3" and reply.cleared_at
        row = next(a for a in admin.list_annotators(judged).annotators if a.annotator_id == "ann-3")
        assert row.cleared and not row.flagged and row.cleared_by == "test-admin"
        events = admin.list_audit_events(judged).events
        assert [(e.action, e.principal) for e in events if e.action == "annotator.clear_flag"] == [
            ("annotator.clear_flag", "test-admin")
        ]

        with pytest.raises(grpc.RpcError) as again:
            admin.clear_annotator_flag(judged, "ann-3")
        assert again.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_key_may_neither_list_nor_clear(judged, grpc_port):
    judged, _ = judged
    with client_for(grpc_port, "client") as client:
        for call in (
            lambda: client.list_annotators(judged),
            lambda: client.clear_annotator_flag(judged, "ann-1"),
        ):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
