"""The shared server bootstrap: health, reflection, graceful readiness flip."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

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


async def test_calls_beyond_maximum_concurrent_rpcs_are_refused_before_any_handler_runs() -> None:
    gate, both_in = asyncio.Event(), asyncio.Event()
    entered: list[bytes] = []

    async def held(request: bytes, context: aio.ServicerContext) -> bytes:
        entered.append(request)
        if len(entered) == 2:
            both_in.set()
        await gate.wait()
        return request

    def register(server: aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(held)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Held", {"Call": handler})]
        )

    server = await start_grpc_server([register], [], maximum_concurrent_rpcs=2)
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary("/test.Held/Call")
        holding = [asyncio.ensure_future(call(b"%d" % i)) for i in range(2)]
        await asyncio.wait_for(both_in.wait(), 10)  # both handlers run, blocked on the gate
        with pytest.raises(aio.AioRpcError) as refused:
            await call(b"over", timeout=10)
        # Answered while both admitted calls are still held; its handler never ran.
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == "Concurrent RPC limit exceeded!"
        assert sorted(entered) == [b"0", b"1"] and not any(h.done() for h in holding)
        gate.set()
        assert sorted(await asyncio.gather(*holding)) == [b"0", b"1"]
        # Capacity frees as calls finish.
        assert await call(b"after", timeout=10) == b"after"
    await server.stop(0)


async def test_maximum_concurrent_rpcs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="maximum_concurrent_rpcs"):
        await start_grpc_server([_peer_service], [], maximum_concurrent_rpcs=0)


def test_calls_beyond_max_pending_calls_are_shed_by_grpc_while_python_cannot_pick_them_up() -> None:
    """While the event loop is blocked, arriving calls pile up in grpc's backlog; past the
    bound grpc sheds them itself (CANCELLED), without Python; the rest are served after."""
    blocked, release, stop = threading.Event(), threading.Event(), threading.Event()
    started: queue.Queue[int] = queue.Queue()

    async def held(request: bytes, context: aio.ServicerContext) -> bytes:
        if request == b"block":
            blocked.set()
            release.wait(20)  # blocks the whole event loop on purpose: nothing is picked up
        return request

    def register(server: aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(held)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Held", {"Call": handler})]
        )

    async def serve() -> None:
        server = await start_grpc_server([register], [], max_pending_calls=4)
        started.put(server.port)
        await asyncio.to_thread(stop.wait, 30)
        await server.stop(0)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    port = started.get(timeout=20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Held/Call")
            blocker = call.future(b"block", timeout=30)
            assert blocked.wait(10)
            later = [call.future(b"%d" % i, timeout=30) for i in range(12)]
            # Shed calls are answered by grpc while Python is still blocked.
            shed_by = time.monotonic() + 10
            while sum(f.done() for f in later) < 6 and time.monotonic() < shed_by:
                time.sleep(0.01)
            shed = [f for f in later if f.done()]
            assert len(shed) >= 6, f"only {len(shed)} of 12 calls shed while the loop was blocked"
            assert {f.code() for f in shed} == {grpc.StatusCode.CANCELLED}
            assert not blocker.done()
            release.set()
            assert blocker.result() == b"block"
            # The rest end either way: grpc's shedding is probabilistic from half the bound, so a
            # call still arriving when the snapshot above was taken may be shed after it too.
            codes = [f.code() for f in later]  # waits for each
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}
            served = [f for f in later if f.code() == grpc.StatusCode.OK]
            assert served, "no call was kept in the backlog and served after the loop was free"
            assert all(f.result() == b"%d" % later.index(f) for f in served)
    finally:
        release.set()
        stop.set()
        thread.join(10)


async def test_max_pending_calls_must_leave_room() -> None:
    with pytest.raises(ValueError, match="max_pending_calls"):
        await start_grpc_server([_peer_service], [], max_pending_calls=1)
