"""The shared server bootstrap: health, reflection, graceful readiness flip."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from snaplearn.vision.v1 import vision_pb2_grpc
from snaplearn_common.server import start_grpc_server

SERVICE = "snaplearn.vision.v1.VisionService"


class _Unimplemented(vision_pb2_grpc.VisionServiceServicer):
    """Only the bootstrap is under test here."""


async def test_health_reflection_and_readiness_flip() -> None:
    server = await start_grpc_server(
        [lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(_Unimplemented(), s)],
        [SERVICE],
        serving=False,
    )
    assert server.port > 0
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await server.set_serving(True)
        for name in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names

        await server.set_serving(False)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.stop(0)


async def _peer(request: bytes, context: aio.ServicerContext) -> bytes:
    return context.peer().encode()


def _peer_service(server: aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(_peer)  # bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Peer", {"Who": handler})])


async def test_max_connection_age_makes_clients_reconnect_without_failing_calls() -> None:
    server = await start_grpc_server(
        [_peer_service], [], max_connection_age_s=0.2, max_connection_age_grace_s=1
    )
    peers: list[str] = []
    deadline = asyncio.get_running_loop().time() + 20
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        who = channel.unary_unary("/test.Peer/Who")
        # Poll until the one channel has been moved to a second connection (a new client port).
        while len(set(peers)) < 2 and asyncio.get_running_loop().time() < deadline:
            peers.append((await who(b"", wait_for_ready=True)).decode())
            await asyncio.sleep(0.02)
    await server.stop(0)
    assert len(set(peers)) >= 2, f"one connection for {len(peers)} calls: {set(peers)}"


async def test_max_connection_age_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connection_age_s"):
        await start_grpc_server([_peer_service], [], max_connection_age_s=0)
