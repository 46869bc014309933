"""One interceptor that maps domain errors to gRPC status codes (table-driven)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from snaplearn_common import errors
from snaplearn_common.interceptors import WrappingInterceptor

log = logging.getLogger(__name__)

# Most specific first; every row is tested (tests/unit/test_grpc_errors.py).
STATUS_BY_ERROR: tuple[tuple[type[errors.SnapLearnError], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


class _Undecodable:
    """What a request's bytes became when they do not parse: answered INVALID_ARGUMENT by the
    handler wrapper (a deserializer that raises makes grpc answer UNKNOWN with a class name)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # a generic handler that takes the raw bytes
        return None
    message_type = getattr(deserializer, "__self__", None)  # Message.FromString, a bound classmethod
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "request")

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # the caller's bytes, whatever the parser's complaint
            if "UTF-8" in str(exc):
                return _Undecodable(
                    f"the request is not a valid {name} message: a string field is not valid UTF-8"
                )
            return _Undecodable(f"the request is not a valid {name} message: its bytes do not parse")

    return deserialize


async def _abort_undecodable(context: aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _checked(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
    """A request stream whose first undecodable message ends the call INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _abort_undecodable(context, request)
        yield request


class ErrorMappingInterceptor(WrappingInterceptor):
    """Turns SnapLearnError (and unexpected exceptions) into a status with a clear message,
    and request bytes that do not parse into INVALID_ARGUMENT in words.

    Unary-unary handlers get both; streaming handlers (ClassifyStream, which answers per item
    through its own wrapper, edges/call.py) get the request check only. Each method's wrapped
    handler is built once (WrappingInterceptor).
    """

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def mapped(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    if isinstance(request, _Undecodable):
                        await _abort_undecodable(context, request)
                    return await inner(request, context)
                except errors.SnapLearnError as exc:
                    await context.abort(status_for(exc), str(exc))
                except aio.AbortError:
                    raise
                except Exception:
                    log.exception("unexpected error in %s", method)
                    await context.abort(
                        grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs"
                    )

            return grpc.unary_unary_rpc_method_handler(
                mapped, request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.stream_stream is not None or handler.stream_unary is not None:
            streaming = handler.stream_stream is not None
            inner_stream = handler.stream_stream if streaming else handler.stream_unary
            if inspect.isasyncgenfunction(inner_stream):

                async def stream_gen(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
                    async for response in inner_stream(_checked(requests, context), context):
                        yield response

                behaviour: Any = stream_gen
            else:

                async def stream_call(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
                    return await inner_stream(_checked(requests, context), context)

                behaviour = stream_call
            make = (
                grpc.stream_stream_rpc_method_handler if streaming else grpc.stream_unary_rpc_method_handler
            )
            return make(behaviour, request_deserializer=deserializer, response_serializer=serializer)
        inner_unary_stream = handler.unary_stream
        if inspect.isasyncgenfunction(inner_unary_stream):

            async def unary_stream_gen(request: Any, context: aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await _abort_undecodable(context, request)
                async for response in inner_unary_stream(request, context):
                    yield response

            unary_behaviour: Any = unary_stream_gen
        else:

            async def unary_stream_call(request: Any, context: aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await _abort_undecodable(context, request)
                return await inner_unary_stream(request, context)

            unary_behaviour = unary_stream_call
        return grpc.unary_stream_rpc_method_handler(
            unary_behaviour, request_deserializer=deserializer, response_serializer=serializer
        )
