"""One interceptor that maps domain errors to gRPC status codes (table-driven)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from snaplearn_common import errors

log = logging.getLogger(__name__)

# Most specific first; every row is tested (tests/unit/test_grpc_errors.py).
STATUS_BY_ERROR: tuple[tuple[type[errors.SnapLearnError], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Turns SnapLearnError (and unexpected exceptions) into a status with a clear message.

    Only unary-unary handlers are wrapped: every SnapLearn RPC is unary. A method's wrapped
    handler is built once and reused: gRPC asks for the handler on every call, and a new
    closure and handler per call is a cost the event loop pays on every request.
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
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary

        async def mapped(request: Any, context: aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except errors.SnapLearnError as exc:
                await context.abort(status_for(exc), str(exc))
            except aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs")

        return grpc.unary_unary_rpc_method_handler(
            mapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
