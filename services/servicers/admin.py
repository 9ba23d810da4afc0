"""AdminService: the adapter registry, tuning rounds and the server's status (admin role).

Until the tuning loop is configured, the registry and round calls answer UNIMPLEMENTED with a
reason; GetServerStatus always works.
"""

from __future__ import annotations

from typing import Any

from illume.errors import Unimplemented
from illume.v1 import illume_pb2 as pb
from services.auth import Caller
from services.servicers.base import ServicerBase, rpc

NOT_YET = "the adapter registry and tuning rounds are not enabled on this server"


class AdminServicer(ServicerBase):
    """Operators' calls."""

    generator: Any
    store_backend: str
    server_version: str

    @rpc("admin", pb.ListAdaptersResponse)
    async def ListAdapters(self, request: Any, grpc_context: Any, caller: Caller) -> Any:
        raise Unimplemented(NOT_YET)

    @rpc("admin", pb.Adapter)
    async def GetAdapter(self, request: Any, grpc_context: Any, caller: Caller) -> Any:
        raise Unimplemented(NOT_YET)

    @rpc("admin", pb.Adapter)
    async def PromoteAdapter(self, request: Any, grpc_context: Any, caller: Caller) -> Any:
        raise Unimplemented(NOT_YET)

    @rpc("admin", pb.Adapter)
    async def RollbackAdapter(self, request: Any, grpc_context: Any, caller: Caller) -> Any:
        raise Unimplemented(NOT_YET)

    @rpc("admin", pb.TuningRound)
    async def StartTuningRound(self, request: Any, grpc_context: Any, caller: Caller) -> Any:
        raise Unimplemented(NOT_YET)

    @rpc("admin", pb.TuningRound)
    async def GetTuningRound(self, request: Any, grpc_context: Any, caller: Caller) -> Any:
        raise Unimplemented(NOT_YET)

    @rpc("admin", pb.ListTuningRoundsResponse)
    async def ListTuningRounds(self, request: Any, grpc_context: Any, caller: Caller) -> Any:
        raise Unimplemented(NOT_YET)

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
