"""Random malformed requests never get INTERNAL (or UNKNOWN): every refusal is precise."""

from __future__ import annotations

import io

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from illume.v1 import illume_pb2 as pb
from illume.v1 import illume_pb2_grpc

from .conftest import KEYS

BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


images = st.one_of(
    st.binary(max_size=256),
    st.builds(_png, st.integers(1, 64), st.integers(1, 64)),
    st.builds(
        lambda b, cut: b[:cut], st.builds(_png, st.integers(8, 32), st.integers(8, 32)), st.integers(0, 60)
    ),
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
sampling = st.builds(
    pb.SamplingParams,
    n=st.integers(0, 200),
    temperatures=st.lists(floats, max_size=10),
    top_k_fraction=floats,
    top_p=floats,
    max_new_tokens=st.integers(0, 5000),
)
texts = st.text(max_size=300)


def _stub(grpc_port: int):
    return illume_pb2_grpc.RationaleServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}")), (
        ("authorization", f"Bearer {KEYS['admin']}"),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    image=images,
    question=texts,
    answer=st.one_of(st.none(), texts),
    sampling=sampling,
    adapter=st.sampled_from(["", "base", "rationale-v3", "canary", "x" * 300, "\x00"]),
    namespace=st.sampled_from(["", "default", "a/b", "x" * 100, "ünï"]),
)
def test_malformed_generate_is_never_internal(
    sqlite_app, grpc_port, image, question, answer, sampling, adapter, namespace
):
    stub, metadata = _stub(grpc_port)
    request = pb.GenerateRequest(
        image=image,
        question=question,
        sampling=sampling,
        adapter=adapter,
        namespace=namespace,
        ephemeral=True,
    )
    if answer is not None:
        request.answer = answer
    request.sampling.max_new_tokens = min(request.sampling.max_new_tokens, 300)
    try:
        stub.Generate(request, metadata=metadata, timeout=120)
    except grpc.RpcError as exc:
        assert exc.code() not in BAD_CODES, exc.details()
        assert "Traceback" not in (exc.details() or "")


feedback_requests = st.builds(
    pb.SubmitFeedbackRequest,
    generation_id=texts,
    verdict=st.integers(0, 5),
    fitting_candidate_ids=st.lists(texts, max_size=4),
    ratings=st.lists(
        st.builds(pb.CandidateRating, candidate_id=texts, rating=st.integers(0, 10)), max_size=3
    ),
    corrected_rationale=st.text(max_size=3000),
    annotator_id=texts,
    idempotency_key=st.text(max_size=200),
    namespace=st.sampled_from(["", "default", "a b"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=feedback_requests)
def test_malformed_feedback_is_never_internal(sqlite_app, grpc_port, request):
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = illume_pb2_grpc.FeedbackServiceStub(channel)
    try:
        stub.SubmitFeedback(request, metadata=(("authorization", f"Bearer {KEYS['admin']}"),), timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() not in BAD_CODES, exc.details()
    finally:
        channel.close()
