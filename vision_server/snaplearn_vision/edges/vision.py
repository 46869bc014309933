"""VisionService: Classify (one photo per call) and ClassifyStream (many, as items of a stream).

Both go through the one edge wrapper (edges.call): deadline, status and request metrics.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import AsyncIterator

from grpc import aio

from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_vision.core.service import ClassificationService
from snaplearn_vision.edges.call import Failed, observed, reply_failed, unary_deadline
from snaplearn_vision.edges.classify import classify_request, classify_response
from snaplearn_vision.edges.stream import INSTANCE_HEADER, ClassifyStreamSession

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
_CLASSIFY_METHOD = f"/{SERVICE_NAME}/Classify"
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
        deadline = unary_deadline(context, started)
        outcome = await observed(
            self._service.metrics,
            classify_request(self._service, request, deadline),
            started=started,
            deadline=deadline,
            method=_CLASSIFY_METHOD,
        )
        if isinstance(outcome, Failed):
            return reply_failed(context, outcome, _EMPTY_RESPONSE)
        return classify_response(outcome)

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
