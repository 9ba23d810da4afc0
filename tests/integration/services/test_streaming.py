"""GenerateStream over the real gRPC server (the session's app, tiny LLaVA): the header first with
the generation id, each candidate as soon as its row ends (a short candidate of a request before
a long one of the same request), the stored generation equal to what was streamed, feedback on a
streamed candidate NOT_FOUND until the stream ends, and a client that goes away: its rows are
dropped from the batch and nothing is stored (docs/SERVING.md, "Streaming and batching")."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.integration.services.test_serving import code_of, png

QUESTION = "what is it?"
# On the session's tiny LLaVA this seed's four rows end after very different numbers of tokens
# (the test asserts it rather than trusting it): short ones by EOS, the longest much later.
SAMPLING = dict(n=4, temperatures=(0.3, 1.5), top_k_fraction=0.5, max_new_tokens=256, seed=12)


def stream(client, **overrides):
    return client.generate_stream(png(), QUESTION, "red", timeout=120, **{**SAMPLING, **overrides})


def generator_status() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name="illume").status.remote().result()


def test_header_first_then_each_candidate_as_its_row_ends(client, annotator):
    arrivals = [(time.monotonic(), message) for message in stream(client)]
    (t_header, first), *rest = arrivals
    assert first.WhichOneof("item") == "header"
    header = first.header
    assert header.generation_id and header.answer == "red" and header.seed == SAMPLING["seed"]
    assert header.adapter_version == "base" and not header.candidates
    assert [m.WhichOneof("item") for _, m in rest] == ["candidate"] * len(rest) and len(rest) >= 2
    sent = [m.candidate for _, m in rest]
    assert [c.index for c in sent] == list(range(len(sent)))
    assert [c.candidate_id for c in sent] == [f"{header.generation_id}-c{i}" for i in range(len(sent))]
    # Rows end one token per step, and each is sent when it ends: finish order, shortest first.
    lengths = [c.token_count for c in sent]
    assert lengths == sorted(lengths) and lengths[-1] - lengths[0] >= 50, lengths
    assert sent[0].finish_reason == 1  # FINISH_REASON_EOS: the short one ended by EOS
    (t_short, _), (t_long, _) = rest[0], rest[-1]
    assert t_header < t_short < t_long and t_long - t_short > 0.03  # not all sent together at the end
    # The stored generation is what was streamed, with the header's id and held-out split.
    stored = annotator.get_generation(header.generation_id, timeout=30)
    assert [(c.candidate_id, c.index, c.text, c.token_count) for c in stored.candidates] == [
        (c.candidate_id, c.index, c.text, c.token_count) for c in sent
    ]
    assert stored.held_out == header.held_out and stored.answer == header.answer
    # Generate (unary) keeps its order and duplicate rule; the unique texts are the same.
    unary = client.generate(png(), QUESTION, "red", timeout=120, **SAMPLING)
    assert {c.text for c in unary.candidates} == {c.text for c in sent}
    assert [c.index for c in unary.candidates] == list(range(len(unary.candidates)))


def test_feedback_on_a_streamed_candidate_is_not_found_until_the_stream_ends(client, annotator):
    messages = stream(client)
    header = next(messages).header
    first = next(messages).candidate
    submit = lambda key: annotator.submit_feedback(  # noqa: E731
        header.generation_id, fitting=[first.candidate_id], idempotency_key=key, timeout=30
    )
    # The longest row is still decoding: the generation is not stored yet.
    assert code_of(lambda: submit(f"early-{header.generation_id}")) == grpc.StatusCode.NOT_FOUND
    rest = list(messages)  # the stream ends OK only after the generation is stored
    assert rest and all(m.WhichOneof("item") == "candidate" for m in rest)
    assert submit(f"late-{header.generation_id}").revision == 1


def test_a_client_that_goes_away_loses_its_rows_and_nothing_is_stored(client, annotator):
    before = generator_status()
    # 64 rows that may not end before 200 tokens: the call is cancelled long before any could end.
    long = dict(n=64, min_new_tokens=200)
    messages = stream(client, **long)
    header = next(messages).header
    cancelled_at = time.monotonic()
    messages.cancel()
    with pytest.raises(grpc.RpcError):
        list(messages)
    deadline = time.monotonic() + 30
    status = generator_status()
    # The cancellation is counted at once; its rows leave the batch at the torch thread's next step.
    while time.monotonic() < deadline and (
        status["streams_cancelled"] == before["streams_cancelled"]
        or status["rows_dropped"] == before["rows_dropped"]
    ):
        time.sleep(0.1)
        status = generator_status()
    noticed_s = time.monotonic() - cancelled_at
    assert status["streams_cancelled"] == before["streams_cancelled"] + 1
    # Every row left the batch unfinished (or was never prefilled): none was decoded to its end.
    assert status["rows_dropped"] - before["rows_dropped"] == long["n"], noticed_s
    # Long past the time the request needed, its generation was never stored.
    time.sleep(1.0)
    assert code_of(lambda: annotator.get_generation(header.generation_id, timeout=30)) == (
        grpc.StatusCode.NOT_FOUND
    )
    # The replica serves on.
    assert len(list(stream(client, max_new_tokens=8))) >= 2
