"""Every row of the domain-error -> status table, through a real grpc.aio server."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_common import errors
from snaplearn_common.grpc_errors import STATUS_BY_ERROR, ErrorMappingInterceptor, status_for
from snaplearn_common.server import start_grpc_server

EXPECTED = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}


def test_table_covers_every_domain_error() -> None:
    table = dict(STATUS_BY_ERROR)
    assert table == EXPECTED
    domain_errors = {cls for cls in vars(errors).values() if isinstance(cls, type)}
    assert domain_errors - {errors.SnapLearnError} == set(EXPECTED)


def test_unknown_exceptions_are_internal() -> None:
    assert status_for(RuntimeError("boom")) == grpc.StatusCode.INTERNAL


class _Raising(vision_pb2_grpc.VisionServiceServicer):
    """Raises the domain error named by the request's user_id."""

    async def Classify(self, request, context):
        if request.user_id == "ok":
            return vision_pb2.ClassifyResponse(request_id="fine")
        if request.user_id == "crash":
            raise RuntimeError("secret internal detail")
        raise getattr(errors, request.user_id)(f"{request.user_id} raised on purpose")

    async def ClassifyStream(self, request_iterator, context):
        async for _request in request_iterator:
            await context.write(vision_pb2.ClassifyStreamResponse())


@pytest.fixture
async def stub():
    server = await start_grpc_server(
        [lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(_Raising(), s)],
        ["snaplearn.vision.v1.VisionService"],
    )
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield vision_pb2_grpc.VisionServiceStub(channel)
    await server.stop(0)


@pytest.mark.parametrize(("error", "code"), list(EXPECTED.items()), ids=lambda v: getattr(v, "__name__", ""))
async def test_each_row_maps_to_its_status_and_server_keeps_serving(stub, error, code) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await stub.Classify(vision_pb2.ClassifyRequest(user_id=error.__name__))
    assert raised.value.code() == code
    assert raised.value.details() == f"{error.__name__} raised on purpose"
    reply = await stub.Classify(vision_pb2.ClassifyRequest(user_id="ok"))
    assert reply.request_id == "fine"


async def test_unexpected_exception_is_internal_without_leaking_details(stub) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await stub.Classify(vision_pb2.ClassifyRequest(user_id="crash"))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in raised.value.details()
    assert "Classify" in raised.value.details()


async def test_a_method_is_wrapped_once_and_reused_for_every_call() -> None:
    registered = grpc.unary_unary_rpc_method_handler(_Raising().Classify)
    other = grpc.unary_unary_rpc_method_handler(_Raising().Classify)
    handlers = {"/a": registered, "/b": registered}

    async def continuation(details):
        return handlers[details.method]

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    interceptor = ErrorMappingInterceptor()
    first = await interceptor.intercept_service(continuation, Details("/a"))
    assert first is not registered and first.unary_unary is not None
    assert await interceptor.intercept_service(continuation, Details("/a")) is first
    # Another method, or the same method re-registered with a new handler, gets its own wrapper.
    assert await interceptor.intercept_service(continuation, Details("/b")) is not first
    handlers["/a"] = other
    assert await interceptor.intercept_service(continuation, Details("/a")) is not first


# Defect (issue 21): request bytes that do not parse, or a string field that is not UTF-8, were
# answered UNKNOWN with grpc's "Unexpected <class 'google.protobuf.message.DecodeError'>".
UNDECODABLE = {
    "corrupt-wire-format": (b"\xff\xff\xff", "is not a valid snaplearn.vision.v1.ClassifyRequest"),
    "user-id-not-utf8": (b"\x0a\x02\xff\xfe", "not valid UTF-8"),
}


@pytest.fixture
async def channel():
    server = await start_grpc_server(
        [lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(_Raising(), s)],
        ["snaplearn.vision.v1.VisionService"],
    )
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened
    await server.stop(0)


@pytest.mark.parametrize(("raw", "words"), list(UNDECODABLE.values()), ids=list(UNDECODABLE))
async def test_undecodable_unary_request_is_invalid_argument_in_words(channel, raw, words) -> None:
    classify = channel.unary_unary("/snaplearn.vision.v1.VisionService/Classify")
    with pytest.raises(aio.AioRpcError) as raised:
        await classify(raw, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    details = raised.value.details() or ""
    assert words in details
    assert "class" not in details and "DecodeError" not in details and "Unexpected" not in details
    reply = await vision_pb2_grpc.VisionServiceStub(channel).Classify(
        vision_pb2.ClassifyRequest(user_id="ok")
    )
    assert reply.request_id == "fine"


@pytest.mark.parametrize(("raw", "words"), list(UNDECODABLE.values()), ids=list(UNDECODABLE))
async def test_an_undecodable_stream_message_ends_the_stream_invalid_argument(channel, raw, words) -> None:
    stream = channel.stream_stream("/snaplearn.vision.v1.VisionService/ClassifyStream")
    call = stream(timeout=10)
    await call.write(vision_pb2.ClassifyStreamRequest().SerializeToString())
    assert await call.read() == vision_pb2.ClassifyStreamResponse().SerializeToString()
    await call.write(raw)
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT, await call.details()
    details = await call.details() or ""
    assert "ClassifyStreamRequest" in details or words in details
    assert "class" not in details and "DecodeError" not in details
