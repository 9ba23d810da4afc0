"""AdminService: the adapter registry, tuning rounds and the server's status (admin role).

Registry reads and alias moves go straight to the ``AdapterRegistry`` (the registry tables are
written by Admin and the LoopController, never by the FeedbackLog); replicas learn of alias moves
from the registry (notification or polling). Rounds are started through the LoopController, the
one place that holds the round lease.

Every call is guarded by the calling key's namespaces (``services/servicers/base.py``). Calls with
no namespace field check what they touch: ``GetTuningRound`` answers NOT_FOUND for a round of a
namespace the key may not use (as for an absent one), ``ListNamespaces`` and ``ListAuditEvents``
return only the key's namespaces, ``DeclareNamespace`` needs an admin key allowed all namespaces.
Promote, rollback, round starts, declarations and annotator flag clears are written to the audit
table with the caller's principal and key id (docs/SERVING.md, "Audit").

Annotators (``ListAnnotators``, ``ClearAnnotatorFlag``; docs/SERVING.md, "Ratings, corrections and
annotator reliability"): like the registry calls, they use the database directly rather than a
deployment, through a ``FeedbackStore`` the replica opens on first use. The agreement is computed
in the Ingress (a read of the namespace's judged generations) so the FeedbackLog's single replica
keeps its time for writes; the flags table is written by the tuning job (flags) and here (clears),
never by the FeedbackLog (docs/ARCHITECTURE.md, "Who writes which table").
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

from illume.adapters import ALIASES, CANARY, PRODUCTION
from illume.errors import FailedPrecondition, InvalidRequest, NotFound, PermissionDenied
from illume.store import FeedbackStore
from illume.store.queue import MAX_POOL_ITEMS_PER_CALL, NewPoolItem
from illume.store.registry import AdapterRegistry
from illume.store.types import AnnotatorFlag
from illume.training.reliability import AnnotatorAgreement
from illume.training.snapshot import SnapshotConfig
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, validate_namespace, validate_pool_item
from services.auth import Caller
from services.convert import (
    adapter_to_pb,
    annotators_to_pb,
    audit_to_pb,
    cleared_flag_to_pb,
    namespace_to_pb,
    round_to_pb,
)
from services.servicers.base import ServicerBase, rpc

_STORE_LOCK = threading.Lock()  # one FeedbackStore per replica, however many calls open it first


def judgement_counts(store: FeedbackStore, namespace: str) -> dict[str, int]:
    """Each annotator's current non-skipped judgements, held-out generations included."""
    counts: Counter[str] = Counter()
    for record in store.iter_judged(namespace, include_held_out=True):
        counts.update(j.annotator_id for j in record.judgements if j.verdict != "skipped")
    return dict(counts)


def annotator_report(
    store: FeedbackStore, namespace: str, snapshot: SnapshotConfig
) -> tuple[list[AnnotatorAgreement], dict[str, int], list[AnnotatorFlag]]:
    """What ``ListAnnotators`` shows: the agreement as the next round computes it (its acceptance
    rule and reliability settings, the generations outside the held-out split, the admins'
    clears), every annotator's judgement count, and every flag of the namespace, cleared ones
    included."""
    from illume.training.from_store import agreement

    agreements = agreement(store, namespace, snapshot.reliability, snapshot.acceptance)
    return (
        agreements,
        judgement_counts(store, namespace),
        store.annotator_flags(namespace, include_cleared=True),
    )


def _flag_of(
    store: FeedbackStore, namespace: str, annotator_id: str, include_cleared: bool = False
) -> AnnotatorFlag:
    """The annotator's flag (only one still set unless ``include_cleared``); ``NotFound`` if none."""
    for flag in store.annotator_flags(namespace, include_cleared=include_cleared):
        if flag.annotator_id == annotator_id:
            return flag
    raise NotFound(f"annotator {annotator_id!r} has no flag set in namespace {namespace!r}")


class AdminServicer(ServicerBase):
    """Operators' calls."""

    generator: Any
    feedback_log: Any
    loop_controller: Any
    registry: AdapterRegistry
    limits: RequestLimits
    store_backend: str
    server_version: str
    config: Any  # the AppConfig (store settings, the snapshot's acceptance and reliability)
    feedback_store: FeedbackStore | None = None  # opened on first use (_annotator_store)

    def _annotator_store(self) -> FeedbackStore:
        """The replica's ``FeedbackStore`` for the annotator calls (blocking: call in a thread)."""
        with _STORE_LOCK:
            if self.feedback_store is None:
                self.feedback_store = FeedbackStore(self.config.feedback_log.store)
            return self.feedback_store

    @rpc("admin", pb.ListAnnotatorsResponse)
    async def ListAnnotators(
        self, request: pb.ListAnnotatorsRequest, grpc_context: Any, caller: Caller
    ) -> pb.ListAnnotatorsResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        snapshot: SnapshotConfig = self.config.tuning.snapshot
        store = await asyncio.to_thread(self._annotator_store)
        report = await asyncio.to_thread(annotator_report, store, namespace, snapshot)
        return annotators_to_pb(*report, snapshot.reliability)

    @rpc("admin", pb.ClearAnnotatorFlagResponse)
    async def ClearAnnotatorFlag(
        self, request: pb.ClearAnnotatorFlagRequest, grpc_context: Any, caller: Caller
    ) -> pb.ClearAnnotatorFlagResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        annotator_id = request.annotator_id.strip()
        if not annotator_id:
            raise InvalidRequest("annotator_id is required")
        store = await asyncio.to_thread(self._annotator_store)
        flag = await asyncio.to_thread(_flag_of, store, namespace, annotator_id)
        # Audited first, as on-behalf feedback is: every clear has its audit row.
        await asyncio.to_thread(
            self.registry.record_audit,
            caller.actor,
            "annotator.clear_flag",
            namespace,
            {"annotator_id": annotator_id, "kappa": flag.kappa, "reason": flag.reason},
        )
        if not await asyncio.to_thread(store.clear_annotator_flag, namespace, annotator_id, caller.principal):
            # Another admin cleared it between the read and the clear.
            raise NotFound(f"annotator {annotator_id!r} has no flag set in namespace {namespace!r}")
        cleared = await asyncio.to_thread(_flag_of, store, namespace, annotator_id, True)
        return cleared_flag_to_pb(cleared)

    @rpc("admin", pb.ListAdaptersResponse)
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, grpc_context: Any, caller: Caller
    ) -> pb.ListAdaptersResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        records, token = await asyncio.to_thread(
            self.registry.list, namespace, request.page_size or 20, request.page_token
        )
        return pb.ListAdaptersResponse(adapters=[adapter_to_pb(r) for r in records], next_page_token=token)

    @rpc("admin", pb.Adapter)
    async def GetAdapter(
        self, request: pb.GetAdapterRequest, grpc_context: Any, caller: Caller
    ) -> pb.Adapter:
        namespace = validate_namespace(request.namespace, self.limits)
        if not request.adapter:
            raise InvalidRequest("adapter is required (a version or an alias)")
        return adapter_to_pb(await asyncio.to_thread(self.registry.get, namespace, request.adapter))

    @rpc("admin", pb.Adapter)
    async def PromoteAdapter(
        self, request: pb.PromoteAdapterRequest, grpc_context: Any, caller: Caller
    ) -> pb.Adapter:
        namespace = validate_namespace(request.namespace, self.limits)
        alias = request.alias or PRODUCTION
        if alias not in ALIASES:
            raise InvalidRequest(f"alias must be one of {', '.join(ALIASES)}")
        if not request.adapter:
            raise InvalidRequest("adapter is required (a version)")
        share = request.canary_share if alias == CANARY else None
        if share is not None and not 0.0 <= share <= 1.0:
            raise InvalidRequest("canary_share must be between 0 and 1")
        record = await asyncio.to_thread(
            self.registry.set_alias, namespace, alias, request.adapter, share, caller.actor
        )
        return adapter_to_pb(record)

    @rpc("admin", pb.Adapter)
    async def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, grpc_context: Any, caller: Caller
    ) -> pb.Adapter:
        namespace = validate_namespace(request.namespace, self.limits)
        return adapter_to_pb(
            await asyncio.to_thread(self.registry.rollback, namespace, PRODUCTION, caller.actor)
        )

    @rpc("admin", pb.TuningRound)
    async def StartTuningRound(
        self, request: pb.StartTuningRoundRequest, grpc_context: Any, caller: Caller
    ) -> pb.TuningRound:
        namespace = validate_namespace(request.namespace, self.limits)
        if self.loop_controller is None:
            raise FailedPrecondition("tuning is disabled on this server (tuning.enabled is false)")
        return round_to_pb(
            await self.loop_controller.start_round.remote(namespace, request.force, caller.actor)
        )

    @rpc("admin", pb.TuningRound, namespace=None)
    async def GetTuningRound(
        self, request: pb.GetTuningRoundRequest, grpc_context: Any, caller: Caller
    ) -> pb.TuningRound:
        if not request.round_id:
            raise InvalidRequest("round_id is required")
        record = await asyncio.to_thread(self.registry.get_round, request.round_id)
        if not caller.may_use(record.namespace):
            # The registry's own reason for an absent round: the two cannot be told apart.
            raise NotFound(f"round {request.round_id} not found")
        return round_to_pb(record)

    @rpc("admin", pb.Namespace, namespace=None)
    async def DeclareNamespace(
        self, request: pb.DeclareNamespaceRequest, grpc_context: Any, caller: Caller
    ) -> pb.Namespace:
        namespace = validate_namespace(request.namespace, self.limits)
        if not caller.all_namespaces:
            raise PermissionDenied("declaring namespaces needs an admin key allowed all namespaces")
        record, _created = await asyncio.to_thread(self.registry.declare_namespace, namespace, caller.actor)
        self.declared.add(namespace)
        return namespace_to_pb(record)

    @rpc("client", pb.ListNamespacesResponse, namespace=None)
    async def ListNamespaces(
        self, request: pb.ListNamespacesRequest, grpc_context: Any, caller: Caller
    ) -> pb.ListNamespacesResponse:
        records = await asyncio.to_thread(self.registry.list_namespaces)
        return pb.ListNamespacesResponse(
            namespaces=[namespace_to_pb(r) for r in records if caller.may_use(r.name)]
        )

    @rpc("client", pb.WhoAmIResponse, namespace=None)
    async def WhoAmI(self, request: pb.WhoAmIRequest, grpc_context: Any, caller: Caller) -> pb.WhoAmIResponse:
        records = await asyncio.to_thread(self.registry.list_namespaces)
        return pb.WhoAmIResponse(
            principal=caller.principal,
            role=caller.role,
            namespaces=[r.name for r in records if caller.may_use(r.name)],
            key_id=caller.key_id,
        )

    @rpc("admin", pb.AddPoolItemsResponse)
    async def AddPoolItems(
        self, request: pb.AddPoolItemsRequest, grpc_context: Any, caller: Caller
    ) -> pb.AddPoolItemsResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        if not 1 <= len(request.items) <= MAX_POOL_ITEMS_PER_CALL:
            raise InvalidRequest(
                f"give 1-{MAX_POOL_ITEMS_PER_CALL} pool items per call, not {len(request.items)}"
            )
        items = await asyncio.to_thread(self._valid_pool_items, request)
        upload = await self.feedback_log.add_pool_items.remote(namespace, items, caller.principal)
        return pb.AddPoolItemsResponse(
            added=upload.added, already_present=upload.already_present, pending=upload.pending
        )

    def _valid_pool_items(self, request: pb.AddPoolItemsRequest) -> list[NewPoolItem]:
        items = []
        for k, item in enumerate(request.items):
            question, answer = validate_pool_item(self.limits, item.image, item.question, item.answer, k)
            items.append(NewPoolItem(image=item.image, question=question, answer=answer))
        return items

    @rpc("admin", pb.ListAuditEventsResponse, namespace=None)
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, grpc_context: Any, caller: Caller
    ) -> pb.ListAuditEventsResponse:
        if request.namespace:
            scope: list[str] | None = [await self.authorize_namespace(caller, request.namespace)]
            system = False
        else:  # every namespace the key may use; system events only for keys allowed all
            scope = None if caller.all_namespaces else sorted(caller.namespaces or ())
            system = caller.all_namespaces
        records, token = await asyncio.to_thread(
            self.registry.list_audit, scope, system, request.page_size or 20, request.page_token
        )
        return pb.ListAuditEventsResponse(events=[audit_to_pb(r) for r in records], next_page_token=token)

    @rpc("admin", pb.ListTuningRoundsResponse)
    async def ListTuningRounds(
        self, request: pb.ListTuningRoundsRequest, grpc_context: Any, caller: Caller
    ) -> pb.ListTuningRoundsResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        records, token = await asyncio.to_thread(
            self.registry.list_rounds, namespace, request.page_size or 20, request.page_token
        )
        return pb.ListTuningRoundsResponse(rounds=[round_to_pb(r) for r in records], next_page_token=token)

    @rpc("client", pb.ServerStatus)
    async def GetServerStatus(
        self, request: pb.GetServerStatusRequest, grpc_context: Any, caller: Caller
    ) -> pb.ServerStatus:
        """Every Generator replica's own report (docs/ARCHITECTURE.md, "Server status"): a Serve
        handle reaches one replica per call, so each replica writes a heartbeat row and this reads
        them all. A replica silent for ``STATUS_STALE_AFTER_S`` is unhealthy, one silent for
        ``STATUS_HIDE_AFTER_S`` is left out; ``ready`` needs a healthy replica with the model
        loaded. Adapters and aliases are shown only for the caller's namespaces."""
        import time

        from illume.store.replicas import ReplicaTable
        from services.convert import replica_status_to_pb
        from services.generator import HEARTBEAT_INTERVAL_S

        stale_after_s, hide_after_s = 5 * HEARTBEAT_INTERVAL_S, 300.0
        beats = await asyncio.to_thread(ReplicaTable(self.registry).list)
        now = time.time()
        replicas = [
            replica_status_to_pb(beat, now, stale_after_s, caller.may_use)
            for beat in beats
            if beat.age_s(now) <= hide_after_s
        ]
        healthy = [r for r in replicas if r.healthy and r.model_id]
        return pb.ServerStatus(
            ready=bool(healthy),
            model_id=healthy[0].model_id if healthy else "",
            server_version=self.server_version,
            replicas=replicas,
            store_backend=self.store_backend,
            healthy_replicas=len(healthy),
        )
