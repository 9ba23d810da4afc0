"""The generated stubs import in every Ray process: a tiny Serve app answers real gRPC calls.

It uses the layout of docs/ARCHITECTURE.md, "Wire contract and generated stubs"
(``package illume.v1`` compiled with ``-Iprotos`` into
the package) through Serve's native gRPC proxy: a unary method, a server-streaming method, and a
status code set through ``grpc_context``.
"""

from __future__ import annotations

import grpc
import pytest

from illume.v1 import illume_pb2, illume_pb2_grpc


@pytest.fixture(scope="module")
def echo_app(grpc_port):
    from ray import serve

    port = grpc_port

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        def Generate(self, request, grpc_context=None):
            from illume.v1 import illume_pb2 as pb  # imported inside the replica process

            if not request.question:
                grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                grpc_context.set_details("question is required")
                return pb.GenerateResponse()
            return pb.GenerateResponse(answer=request.question.upper(), model_id="echo")

        def GenerateStream(self, request):
            from illume.v1 import illume_pb2 as pb

            yield pb.GenerateStreamResponse(header=pb.GenerateResponse(answer="a"))
            for i in range(3):
                yield pb.GenerateStreamResponse(candidate=pb.Candidate(index=i, text=f"c{i}"))

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield illume_pb2_grpc.RationaleServiceStub(channel)
    channel.close()
    serve.delete("echo")


def test_unary_call_through_the_serve_grpc_proxy(echo_app):
    reply = echo_app.Generate(
        illume_pb2.GenerateRequest(question="why?"), metadata=(("application", "echo"),), timeout=30
    )
    assert reply.answer == "WHY?" and reply.model_id == "echo"


def test_status_code_set_by_the_method(echo_app):
    with pytest.raises(grpc.RpcError) as info:
        echo_app.Generate(illume_pb2.GenerateRequest(), metadata=(("application", "echo"),), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "question is required"


def test_server_streaming(echo_app):
    replies = list(
        echo_app.GenerateStream(
            illume_pb2.GenerateRequest(question="q"), metadata=(("application", "echo"),), timeout=30
        )
    )
    assert replies[0].WhichOneof("item") == "header"
    assert [r.candidate.text for r in replies[1:]] == ["c0", "c1", "c2"]
