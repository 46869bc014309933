"""The gRPC edge of the vision server: proto <-> core, and the request-level metrics.

Domain errors raised by the core propagate; the shared ErrorMappingInterceptor (installed
by snaplearn_common.server.start_grpc_server) turns them into status codes.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator

from grpc import aio

from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_common.errors import SnapLearnError
from snaplearn_common.grpc_errors import status_for
from snaplearn_vision.service import ClassificationService
from snaplearn_vision.stream_servicer import (
    INSTANCE_HEADER,
    ClassifyStreamSession,
    classify_request,
    classify_response,
)

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
_EMPTY_RESPONSE = vision_pb2.ClassifyResponse()


def new_instance_id() -> str:
    """Names this server process for ClassifyStream clients: host, pid and a random part (a
    restarted worker may get its predecessor's pid)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, service: ClassificationService, instance_id: str | None = None) -> None:
        self._service = service
        self._streams: set[ClassifyStreamSession] = set()
        self._draining = False
        self.instance_id = instance_id or new_instance_id()

    async def Classify(
        self, request: vision_pb2.ClassifyRequest, context: aio.ServicerContext
    ) -> vision_pb2.ClassifyResponse:
        started = time.monotonic()
        remaining_s = context.time_remaining()
        deadline = started + remaining_s if remaining_s is not None else None
        code = "OK"
        try:
            result = await classify_request(self._service, request, deadline)
        except asyncio.CancelledError:
            # The client went away or its deadline passed; gRPC cancels this handler.
            code = (
                "DEADLINE_EXCEEDED" if deadline is not None and time.monotonic() >= deadline else "CANCELLED"
            )
            raise
        except SnapLearnError as exc:
            # The hot error path (RESOURCE_EXHAUSTED under overload) answers here, with the
            # interceptor's mapping, instead of raising through it: context.abort() raises
            # once more inside gRPC and costs the event loop more than setting the status.
            status = status_for(exc)
            code = status.name
            context.set_code(status)
            context.set_details(str(exc))
            return _EMPTY_RESPONSE  # gRPC discards the message of a non-OK status
        except Exception as exc:
            code = status_for(exc).name
            raise
        finally:
            self._service.metrics.observe_request(code, time.monotonic() - started)
        return classify_response(result)

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[vision_pb2.ClassifyStreamRequest],
        context: aio.ServicerContext,
    ) -> None:
        # Headers at once, naming this process: a gateway with several connections to a port
        # shared by worker processes sends each worker's items on one stream (packed).
        await context.send_initial_metadata(((INSTANCE_HEADER, self.instance_id),))
        session = ClassifyStreamSession(self._service)
        self._streams.add(session)
        if self._draining:
            # It opened while the server began stopping (drain_streams ran during the await
            # above, or the gateway's new stream reached this port's draining process): it
            # starts nothing and ends OK at once, so the client sends its items elsewhere
            # instead of having them cut when the shutdown grace ends.
            session.drain()
        try:
            await session.serve(request_iterator, context)
        finally:
            self._streams.discard(session)

    def drain_streams(self) -> None:
        """Shutting down: every open ClassifyStream (and any opened from now on) answers what it
        started and ends OK."""
        self._draining = True
        for session in self._streams:
            session.drain()

    def register(self, server: aio.Server) -> None:
        """What start_grpc_server's `registrars` wants: adds this VisionService to a server."""
        vision_pb2_grpc.add_VisionServiceServicer_to_server(self, server)
