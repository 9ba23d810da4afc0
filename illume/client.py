"""A typed Python client of the illume gRPC API.

This module is the wire client, not part of the core: it is the one module of the package that
imports the generated stubs (``illume.v1``, made by ``make proto``), lazily, and no core module
imports it. Replies are the protobuf messages of ``protos/illume/v1/illume.proto``.

Deadlines and retries. Every call takes a deadline (``timeout`` seconds from the call). Each
attempt sends the time then left both as its gRPC timeout and as ``illume-timeout-ms`` metadata:
gRPC's own deadline is not visible to a Serve deployment, so the server drops work whose caller
has given up by that value (docs/SERVING.md). A call that fails with UNAVAILABLE (a replica is
restarting) is retried up to ``retries`` times, after pauses of ``backoff_s``, 2x, 4x, ... A retry
is made only if, when the attempt fails, the deadline leaves room for the pause plus
``MIN_ATTEMPT_S`` for the next attempt; otherwise the UNAVAILABLE error is raised at once. So no
pause runs past the deadline, no attempt starts with less than ``MIN_ATTEMPT_S`` left, and the
caller sees the real cause rather than the DEADLINE_EXCEEDED of a hopeless last attempt. Other
status codes are not retried. A server stream is retried the same way until its first message
arrives, never after (that would repeat messages).

The retries are this module's loop, not gRPC's ``retryPolicy`` (service config): with gRPC's
retries the call's metadata is fixed when the call starts, so every retry would repeat the first
attempt's ``illume-timeout-ms`` and the server would keep queued work past the moment its caller
gives up. gRPC recomputes only its own ``grpc-timeout`` header per attempt, which the server does
not see. The loop computes both from one reading of the clock per attempt.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from illume.adapters import PRODUCTION

DEFAULT_TIMEOUT_S = 60.0
MIN_ATTEMPT_S = 0.05  # a retry is made only if at least this much of the deadline is left for it
API_KEY_ENV = "ILLUME_API_KEY"


def read_api_key(api_key: str | None = None, api_key_file: str | Path | None = None) -> str | None:
    """The key given, else the file's content, else the ``ILLUME_API_KEY`` environment variable."""
    if api_key:
        return api_key
    if api_key_file:
        return Path(api_key_file).read_text().strip()
    return os.environ.get(API_KEY_ENV) or None


class IllumeClient:
    """Client of RationaleService, FeedbackService and AdminService on one channel."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        api_key_file: str | Path | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        from illume.v1 import illume_pb2, illume_pb2_grpc

        self.pb = illume_pb2
        options = [("grpc.max_send_message_length", max_message_bytes)]
        self.channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        self.rationale = illume_pb2_grpc.RationaleServiceStub(self.channel)
        self.feedback = illume_pb2_grpc.FeedbackServiceStub(self.channel)
        self.admin = illume_pb2_grpc.AdminServiceStub(self.channel)
        self.api_key = read_api_key(api_key, api_key_file)
        self.retries = retries
        self.backoff_s = backoff_s

    def __enter__(self) -> IllumeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _metadata(self, timeout: float) -> list[tuple[str, str]]:
        """Per-attempt metadata: ``timeout`` is the time left to the caller's deadline (seconds)."""
        metadata = [("illume-timeout-ms", str(max(0, int(timeout * 1000))))]
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        return metadata

    def _attempt_options(self, deadline: float) -> dict[str, Any]:
        """The gRPC timeout and the metadata of an attempt that starts now, from one clock reading."""
        remaining = max(deadline - time.monotonic(), 0.001)
        return {"timeout": remaining, "metadata": self._metadata(remaining)}

    def _pause_before_retry(self, error: grpc.RpcError, retries_done: int, deadline: float) -> float | None:
        """Seconds to wait before retrying a failed attempt, or None when the error is final."""
        if retries_done >= self.retries or error.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        pause = self.backoff_s * 2**retries_done
        if deadline - time.monotonic() - pause < MIN_ATTEMPT_S:
            return None
        return pause

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        deadline = time.monotonic() + (timeout or DEFAULT_TIMEOUT_S)
        retries_done = 0
        while True:
            try:
                return method(request, **self._attempt_options(deadline))
            except grpc.RpcError as error:
                pause = self._pause_before_retry(error, retries_done, deadline)
                if pause is None:
                    raise
            retries_done += 1
            time.sleep(pause)

    def _stream(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Iterator[Any]:
        deadline = time.monotonic() + (timeout or DEFAULT_TIMEOUT_S)
        return _RetryingStream(self, method, request, deadline)

    # -- RationaleService ----------------------------------------------------------------------

    def _generate_request(
        self,
        image: bytes,
        question: str,
        answer: str | None,
        n: int,
        temperatures: Sequence[float],
        top_k_fraction: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None,
        adapter: str,
        namespace: str,
        client_request_id: str,
        ephemeral: bool,
        min_new_tokens: int = 0,
    ) -> Any:
        sampling = self.pb.SamplingParams(
            min_new_tokens=min_new_tokens,
            n=n,
            temperatures=list(temperatures),
            top_k_fraction=top_k_fraction,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        if seed is not None:
            sampling.seed = seed
        request = self.pb.GenerateRequest(
            image=image,
            question=question,
            sampling=sampling,
            adapter=adapter,
            namespace=namespace,
            client_request_id=client_request_id,
            ephemeral=ephemeral,
        )
        if answer is not None:
            request.answer = answer
        return request

    def generate(
        self,
        image: bytes,
        question: str,
        answer: str | None = None,
        *,
        n: int = 0,
        temperatures: Sequence[float] = (),
        top_k_fraction: float = 0.0,
        top_p: float = 0.0,
        max_new_tokens: int = 0,
        seed: int | None = None,
        adapter: str = "",
        namespace: str = "",
        client_request_id: str = "",
        ephemeral: bool = False,
        min_new_tokens: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """Candidate rationales (a ``GenerateResponse``); 0 or empty values take server defaults."""
        request = self._generate_request(
            image,
            question,
            answer,
            n,
            temperatures,
            top_k_fraction,
            top_p,
            max_new_tokens,
            seed,
            adapter,
            namespace,
            client_request_id,
            ephemeral,
            min_new_tokens,
        )
        return self._call(self.rationale.Generate, request, timeout)

    def generate_stream(
        self,
        image: bytes,
        question: str,
        answer: str | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """``GenerateStreamResponse`` messages: a header, then one per candidate."""
        defaults = dict(
            n=0,
            temperatures=(),
            top_k_fraction=0.0,
            top_p=0.0,
            max_new_tokens=0,
            seed=None,
            adapter="",
            namespace="",
            client_request_id="",
            ephemeral=False,
        )
        defaults.update(kwargs)
        request = self._generate_request(image, question, answer, **defaults)
        return self._stream(self.rationale.GenerateStream, request, timeout)

    # -- FeedbackService -----------------------------------------------------------------------

    def submit_feedback(
        self,
        generation_id: str,
        *,
        fitting: Sequence[str] = (),
        none_fit: bool = False,
        skipped: bool = False,
        ratings: dict[str, int] | None = None,
        answer_correct: bool | None = None,
        corrected_rationale: str = "",
        annotator_id: str = "",
        idempotency_key: str | None = None,
        namespace: str = "",
        timeout: float | None = None,
    ) -> Any:
        """Judge a generation: ``fitting`` candidate ids, or ``none_fit``, or ``skipped``."""
        pb = self.pb
        if sum([bool(fitting), none_fit, skipped]) != 1:
            raise ValueError("give exactly one of fitting ids, none_fit or skipped")
        verdict = pb.VERDICT_SELECTED if fitting else pb.VERDICT_NONE_FIT if none_fit else pb.VERDICT_SKIPPED
        request = pb.SubmitFeedbackRequest(
            generation_id=generation_id,
            verdict=verdict,
            fitting_candidate_ids=list(fitting),
            ratings=[pb.CandidateRating(candidate_id=k, rating=v) for k, v in (ratings or {}).items()],
            corrected_rationale=corrected_rationale,
            annotator_id=annotator_id,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
            namespace=namespace,
        )
        if answer_correct is not None:
            request.answer_correct = answer_correct
        return self._call(self.feedback.SubmitFeedback, request, timeout)

    def get_generation(self, generation_id: str, namespace: str = "", timeout: float | None = None) -> Any:
        request = self.pb.GetGenerationRequest(generation_id=generation_id, namespace=namespace)
        return self._call(self.feedback.GetGeneration, request, timeout)

    def next_item(self, namespace: str = "", selection: str = "", timeout: float | None = None) -> Any:
        """The caller's next item to judge, leased to them (a ``NextItemResponse``; ``has_item``
        False when nothing is left; annotator role). ``selection``: "active", "random" or "" (the
        server's mode)."""
        request = self.pb.NextItemRequest(namespace=namespace, selection=selection)
        return self._call(self.feedback.NextItem, request, timeout)

    def get_image(self, image_sha256: str, namespace: str = "", timeout: float | None = None) -> bytes:
        """The bytes of an image the namespace holds (annotator role)."""
        request = self.pb.GetImageRequest(image_sha256=image_sha256, namespace=namespace)
        return self._call(self.feedback.GetImage, request, timeout).image

    def stats(self, namespace: str = "", timeout: float | None = None) -> Any:
        return self._call(
            self.feedback.GetFeedbackStats, self.pb.GetFeedbackStatsRequest(namespace=namespace), timeout
        )

    def export(
        self,
        format: str = "sft",
        namespace: str = "",
        *,
        page_size: int = 0,
        cursor: str = "",
        include_held_out: bool = False,
        max_pages: int = 0,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """``ExportFeedbackResponse`` rows (format: sft, dpo or kto)."""
        formats = {
            "sft": self.pb.EXPORT_FORMAT_SFT,
            "dpo": self.pb.EXPORT_FORMAT_DPO,
            "kto": self.pb.EXPORT_FORMAT_KTO,
        }
        request = self.pb.ExportFeedbackRequest(
            namespace=namespace,
            format=formats[format],
            cursor=cursor,
            page_size=page_size,
            include_held_out=include_held_out,
            max_pages=max_pages,
        )
        return self._stream(self.feedback.ExportFeedback, request, timeout)

    # -- AdminService --------------------------------------------------------------------------

    def server_status(self, timeout: float | None = None) -> Any:
        return self._call(self.admin.GetServerStatus, self.pb.GetServerStatusRequest(), timeout)

    def list_adapters(
        self, namespace: str = "", page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> Any:
        request = self.pb.ListAdaptersRequest(namespace=namespace, page_size=page_size, page_token=page_token)
        return self._call(self.admin.ListAdapters, request, timeout)

    def get_adapter(self, adapter: str, namespace: str = "", timeout: float | None = None) -> Any:
        return self._call(
            self.admin.GetAdapter, self.pb.GetAdapterRequest(namespace=namespace, adapter=adapter), timeout
        )

    def promote(
        self,
        adapter: str,
        alias: str = PRODUCTION,
        namespace: str = "",
        canary_share: float = 0.0,
        timeout: float | None = None,
    ) -> Any:
        request = self.pb.PromoteAdapterRequest(
            namespace=namespace, adapter=adapter, alias=alias, canary_share=canary_share
        )
        return self._call(self.admin.PromoteAdapter, request, timeout)

    def rollback(self, namespace: str = "", timeout: float | None = None) -> Any:
        return self._call(
            self.admin.RollbackAdapter, self.pb.RollbackAdapterRequest(namespace=namespace), timeout
        )

    def start_round(self, namespace: str = "", force: bool = False, timeout: float | None = None) -> Any:
        request = self.pb.StartTuningRoundRequest(namespace=namespace, force=force)
        return self._call(self.admin.StartTuningRound, request, timeout)

    def get_round(self, round_id: str, timeout: float | None = None) -> Any:
        return self._call(
            self.admin.GetTuningRound, self.pb.GetTuningRoundRequest(round_id=round_id), timeout
        )

    def list_rounds(
        self, namespace: str = "", page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> Any:
        request = self.pb.ListTuningRoundsRequest(
            namespace=namespace, page_size=page_size, page_token=page_token
        )
        return self._call(self.admin.ListTuningRounds, request, timeout)

    def declare_namespace(self, namespace: str, timeout: float | None = None) -> Any:
        """Declare a namespace (idempotent; needs an admin key allowed all namespaces)."""
        return self._call(
            self.admin.DeclareNamespace, self.pb.DeclareNamespaceRequest(namespace=namespace), timeout
        )

    def list_namespaces(self, timeout: float | None = None) -> Any:
        """The declared namespaces this key may use (a ``ListNamespacesResponse``)."""
        return self._call(self.admin.ListNamespaces, self.pb.ListNamespacesRequest(), timeout)

    def list_audit_events(
        self, namespace: str = "", page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> Any:
        """Audit events, newest first (namespace "": every namespace the key may use)."""
        request = self.pb.ListAuditEventsRequest(
            namespace=namespace, page_size=page_size, page_token=page_token
        )
        return self._call(self.admin.ListAuditEvents, request, timeout)

    def list_annotators(self, namespace: str = "", timeout: float | None = None) -> Any:
        """The namespace's annotators: judgements, agreement (kappa) and reliability flags (a
        ``ListAnnotatorsResponse``; admin role)."""
        request = self.pb.ListAnnotatorsRequest(namespace=namespace)
        return self._call(self.admin.ListAnnotators, request, timeout)

    def clear_annotator_flag(self, namespace: str, annotator_id: str, timeout: float | None = None) -> Any:
        """Clear an annotator's reliability flag (audited; NOT_FOUND when none is set)."""
        request = self.pb.ClearAnnotatorFlagRequest(namespace=namespace, annotator_id=annotator_id)
        return self._call(self.admin.ClearAnnotatorFlag, request, timeout)

    def who_am_i(self, timeout: float | None = None) -> Any:
        """The calling key: principal, role, namespaces (a ``WhoAmIResponse``; any role)."""
        return self._call(self.admin.WhoAmI, self.pb.WhoAmIRequest(), timeout)

    def add_pool_items(
        self, items: Sequence[tuple[bytes, str, str]], namespace: str = "", timeout: float | None = None
    ) -> Any:
        """Add (image bytes, question, answer or "") items to the namespace's judging pool (an
        ``AddPoolItemsResponse``; admin role)."""
        request = self.pb.AddPoolItemsRequest(
            namespace=namespace,
            items=[self.pb.PoolItem(image=image, question=q, answer=a) for image, q, a in items],
        )
        return self._call(self.admin.AddPoolItems, request, timeout)


class _RetryingStream:
    """The messages of a server-streaming call, retried on UNAVAILABLE until the first one arrives.

    The first attempt starts at once, as a plain gRPC call does. Attributes other than iteration
    (``code()``, ``details()``, ``initial_metadata()``, ...) are those of the current attempt.
    """

    def __init__(self, client: IllumeClient, method: Callable[..., Any], request: Any, deadline: float):
        self._client, self._method, self._request, self._deadline = client, method, request, deadline
        self._retries_done = 0
        self._received = False
        self._cancelled = False
        self._call = method(request, **client._attempt_options(deadline))

    def __iter__(self) -> _RetryingStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as error:
                pause = (
                    None
                    if self._received or self._cancelled
                    else self._client._pause_before_retry(error, self._retries_done, self._deadline)
                )
                if pause is None:
                    raise
                failed = error
            else:
                self._received = True
                return message
            self._retries_done += 1
            time.sleep(pause)
            if self._cancelled:  # by another thread during the pause
                raise failed
            self._call = self._method(self._request, **self._client._attempt_options(self._deadline))

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()

    def __getattr__(self, name: str) -> Any:
        if name == "_call":
            raise AttributeError(name)
        return getattr(self._call, name)
