"""AdminService: the adapter registry, tuning rounds and the server's status (admin role).

Registry reads and alias moves go straight to the ``AdapterRegistry`` (the registry tables are
written by Admin and the LoopController, never by the FeedbackLog); replicas learn of alias moves
from the registry (notification or polling). Rounds are started through the LoopController, the
one place that holds the round lease.
"""

from __future__ import annotations

import asyncio
from typing import Any

from illume.adapters import ALIASES, CANARY, PRODUCTION
from illume.errors import FailedPrecondition, InvalidRequest
from illume.store.registry import AdapterRegistry
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, validate_namespace
from services.auth import Caller
from services.convert import adapter_to_pb, round_to_pb
from services.servicers.base import ServicerBase, rpc


class AdminServicer(ServicerBase):
    """Operators' calls."""

    generator: Any
    loop_controller: Any
    registry: AdapterRegistry
    limits: RequestLimits
    store_backend: str
    server_version: str

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
        record = await asyncio.to_thread(self.registry.set_alias, namespace, alias, request.adapter, share)
        return adapter_to_pb(record)

    @rpc("admin", pb.Adapter)
    async def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, grpc_context: Any, caller: Caller
    ) -> pb.Adapter:
        namespace = validate_namespace(request.namespace, self.limits)
        return adapter_to_pb(await asyncio.to_thread(self.registry.rollback, namespace))

    @rpc("admin", pb.TuningRound)
    async def StartTuningRound(
        self, request: pb.StartTuningRoundRequest, grpc_context: Any, caller: Caller
    ) -> pb.TuningRound:
        namespace = validate_namespace(request.namespace, self.limits)
        if self.loop_controller is None:
            raise FailedPrecondition("tuning is disabled on this server (tuning.enabled is false)")
        return round_to_pb(await self.loop_controller.start_round.remote(namespace, request.force))

    @rpc("admin", pb.TuningRound)
    async def GetTuningRound(
        self, request: pb.GetTuningRoundRequest, grpc_context: Any, caller: Caller
    ) -> pb.TuningRound:
        if not request.round_id:
            raise InvalidRequest("round_id is required")
        return round_to_pb(await asyncio.to_thread(self.registry.get_round, request.round_id))

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
        status = await self.generator.status.remote()
        replica = pb.ReplicaStatus(
            replica_id=status["replica_id"],
            loaded_adapters=status["loaded_adapters"],
            aliases=status["aliases"],
            queue_depth=status["queue_depth"],
        )
        return pb.ServerStatus(
            ready=True,
            model_id=status["model_id"],
            server_version=self.server_version,
            replicas=[replica],
            store_backend=self.store_backend,
        )
