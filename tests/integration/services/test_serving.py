"""The served application over real gRPC: generation, feedback, errors, batching, metrics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from illume.v1 import illume_pb2 as pb

from .conftest import KEYS, MAX_BATCH, client_for, metric_sum, png, settled_metric, wait_for_metric


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert "Traceback" not in (info.value.details() or "")
    return info.value.code()


def test_generate_returns_unique_candidates_with_ids_seed_and_version(client):
    reply = client.generate(png(), "what colour is the square?", n=6, seed=42, max_new_tokens=8, timeout=60)
    assert reply.generation_id and reply.seed == 42 and reply.adapter_version == "base"
    assert reply.answer_generated and reply.model_id
    texts = [c.text for c in reply.candidates]
    assert 1 <= len(texts) <= 6 and len(set(texts)) == len(texts)
    assert all(c.candidate_id.startswith(reply.generation_id) for c in reply.candidates)
    assert reply.timings.batch_size >= 1
    again = client.generate(png(), "what colour is the square?", n=6, seed=42, max_new_tokens=8, timeout=60)
    assert [c.text for c in again.candidates] == texts and again.generation_id != reply.generation_id


def test_given_answer_is_used_and_ephemeral_is_not_logged(client):
    reply = client.generate(
        png("blue"), "what colour?", "blue", n=2, max_new_tokens=4, ephemeral=True, timeout=60
    )
    assert reply.answer == "blue" and not reply.answer_generated
    assert reply.generation_id == "" and all(c.candidate_id == "" for c in reply.candidates)


def test_stream_sends_header_then_candidates(client):
    replies = list(client.generate_stream(png(), "what is it?", "red", n=3, max_new_tokens=4, timeout=60))
    assert replies[0].WhichOneof("item") == "header" and replies[0].header.generation_id
    assert all(r.WhichOneof("item") == "candidate" for r in replies[1:]) and len(replies) >= 2


def test_feedback_round_trip_and_idempotency(client, annotator):
    reply = client.generate(png(), "what colour is the square?", "red", n=4, max_new_tokens=6, timeout=60)
    fit = reply.candidates[0].candidate_id
    first = annotator.submit_feedback(
        reply.generation_id,
        fitting=[fit],
        idempotency_key="round-trip-1",
        ratings={fit: 4},
        answer_correct=True,
    )
    assert first.feedback_id and not first.duplicate and first.revision == 1
    repeat = annotator.submit_feedback(
        reply.generation_id,
        fitting=[fit],
        idempotency_key="round-trip-1",
        ratings={fit: 4},
        answer_correct=True,
    )
    assert repeat.duplicate and repeat.feedback_id == first.feedback_id
    assert (
        code_of(
            lambda: annotator.submit_feedback(
                reply.generation_id, none_fit=True, idempotency_key="round-trip-1"
            )
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )
    revised = annotator.submit_feedback(reply.generation_id, none_fit=True, idempotency_key="round-trip-2")
    assert revised.revision == 2
    stored = annotator.get_generation(reply.generation_id)
    assert [c.text for c in stored.candidates] == [c.text for c in reply.candidates]
    [judgement] = stored.judgements
    assert judgement.verdict == pb.VERDICT_NONE_FIT and judgement.revision == 2
    assert judgement.annotator_id == "test-annotator"


def test_error_codes(client, annotator, admin):
    reply = client.generate(png(), "q?", "a", n=2, max_new_tokens=3, timeout=60)
    cases = {
        "bad image": (
            lambda: client.generate(b"\x89PNG\r\n garbage", "q?"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "bad n": (lambda: client.generate(png(), "q?", n=1000), grpc.StatusCode.INVALID_ARGUMENT),
        "no question": (lambda: client.generate(png(), ""), grpc.StatusCode.INVALID_ARGUMENT),
        "unknown adapter": (
            lambda: client.generate(png(), "q?", adapter="rationale-v99"),
            grpc.StatusCode.NOT_FOUND,
        ),
        "unknown generation": (
            lambda: annotator.submit_feedback("nope", none_fit=True),
            grpc.StatusCode.NOT_FOUND,
        ),
        "foreign candidate": (
            lambda: annotator.submit_feedback(reply.generation_id, fitting=["other-c0"]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "no verdict": (
            lambda: annotator._call(
                annotator.feedback.SubmitFeedback,
                pb.SubmitFeedbackRequest(generation_id=reply.generation_id, idempotency_key="x"),
                30,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "client may not judge": (
            lambda: client.submit_feedback(reply.generation_id, none_fit=True),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "annotator may not export": (
            lambda: list(annotator.export("sft")),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "unknown adapter version": (lambda: admin.get_adapter("rationale-v404"), grpc.StatusCode.NOT_FOUND),
        "tuning disabled": (lambda: admin.start_round(force=True), grpc.StatusCode.FAILED_PRECONDITION),
        "bad alias": (lambda: admin.promote("1", alias="staging"), grpc.StatusCode.INVALID_ARGUMENT),
        "nothing to roll back": (lambda: admin.rollback(), grpc.StatusCode.FAILED_PRECONDITION),
    }
    for name, (call, expected) in cases.items():
        assert code_of(call) == expected, name


def test_unauthenticated(grpc_port, sqlite_app):
    from illume.client import IllumeClient

    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key="wrong") as wrong:
        assert code_of(lambda: wrong.server_status(timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
    with IllumeClient(f"127.0.0.1:{grpc_port}") as anonymous:
        anonymous.api_key = None
        assert code_of(lambda: anonymous.server_status(timeout=30)) == grpc.StatusCode.UNAUTHENTICATED


def test_export_streams_sft_rows(client, annotator, admin):
    import json

    reply = client.generate(png("green"), "what colour is it?", "green", n=3, max_new_tokens=5, timeout=60)
    annotator.submit_feedback(
        reply.generation_id,
        fitting=[reply.candidates[0].candidate_id],
        idempotency_key=f"export-{reply.generation_id}",
    )
    rows = [json.loads(r.json_row) for r in admin.export("sft", include_held_out=True, page_size=2)]
    texts = {(r["prompt"], r["completion"]) for r in rows}
    # TRL rows concatenate prompt and completion, so the completion starts with the space.
    assert ("Q: what colour is it? A: green, seeing that", " " + reply.candidates[0].text) in texts


def test_concurrent_requests_are_batched(client, grpc_port, metrics_port):
    """Mean batch size (from the server's metrics) is at least half of min(concurrency, max batch)."""
    concurrency, requests = 8, 24
    requests_before = settled_metric(metrics_port, "ray_illume_batched_requests_total")
    batches_before = metric_sum(metrics_port, "ray_illume_batches_total")

    def one(i: int):
        return client.generate(
            png(), f"question {i}?", "red", n=2, max_new_tokens=16, ephemeral=True, timeout=120
        )

    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, range(requests)))
    assert len(replies) == requests
    served = wait_for_metric(
        metrics_port, "ray_illume_batched_requests_total", lambda v: v >= requests_before + requests
    )
    batches = metric_sum(metrics_port, "ray_illume_batches_total") - batches_before
    assert served - requests_before == requests
    assert (served - requests_before) / batches >= min(concurrency, MAX_BATCH) / 2


def test_request_counter_increases_exactly(admin, metrics_port):
    name = "ray_illume_requests_total"
    before = settled_metric(metrics_port, name, rpc="GetServerStatus", code="OK")
    calls = 7
    for _ in range(calls):
        assert admin.server_status(timeout=30).ready
    after = wait_for_metric(
        metrics_port, name, lambda v: v >= before + calls, rpc="GetServerStatus", code="OK"
    )
    assert after - before == calls


def test_expired_deadline_is_dropped_before_its_batch(grpc_port, sqlite_app):
    """A request whose illume-timeout-ms passes while it waits is answered DEADLINE_EXCEEDED."""
    from illume.v1 import illume_pb2_grpc

    busy = threading.Thread(target=lambda: _flood(grpc_port, 6, max_new_tokens=64))
    busy.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = illume_pb2_grpc.RationaleServiceStub(channel)
    request = pb.GenerateRequest(
        image=png(),
        question="late?",
        answer="x",
        ephemeral=True,
        sampling=pb.SamplingParams(n=1, max_new_tokens=2),
    )
    metadata = (("authorization", f"Bearer {KEYS['client']}"), ("illume-timeout-ms", "1"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=metadata, timeout=60)
    busy.join()
    channel.close()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in info.value.details()


def _flood(port: int, count: int, max_new_tokens: int) -> list:
    results = []

    def one(i: int):
        with client_for(port, "client") as c:
            try:
                c.retries = 0
                return c.generate(
                    png(),
                    f"flood {i}?",
                    "a",
                    n=4,
                    max_new_tokens=max_new_tokens,
                    temperatures=[1.0],
                    ephemeral=True,
                    timeout=120,
                )
            except grpc.RpcError as exc:
                return exc.code()

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    return results


def test_full_queue_is_resource_exhausted(grpc_port, sqlite_app):
    results = _flood(grpc_port, 40, max_new_tokens=48)
    codes = {r for r in results if isinstance(r, grpc.StatusCode)}
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any(not isinstance(r, grpc.StatusCode) for r in results)  # the admitted ones were answered
