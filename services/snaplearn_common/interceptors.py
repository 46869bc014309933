"""The base of the servers' interceptors that wrap each method's handler (no domain rules here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from grpc import aio


class WrappingInterceptor(aio.ServerInterceptor):
    """An interceptor that replaces a method's handler by a wrapped one, built once per method.

    gRPC asks for the handler on every call; a new closure and handler per call is a cost the
    event loop pays on every request, so the wrapped handler is kept and reused for as long as
    the registered handler it wraps is the same object. Subclasses say how to wrap (`_wrap`)
    and which methods to leave alone (`_passes`).
    """

    def __init__(self) -> None:
        # method -> (the registered handler, its wrapped version)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._passes(method):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _passes(self, method: str) -> bool:
        """True for a method whose handler is returned as it is."""
        return False

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError
