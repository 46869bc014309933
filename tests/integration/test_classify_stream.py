"""ClassifyStream over real gRPC: every item answered once by id with Classify's own outcome;
cancelled and expired items answered while the model is still held, and never computed.

The model is held behind a gate (tests/helpers/vision_server.py): "never computed" is the
gate's record of batch sizes, not a timing.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import grpc
import pytest

from snaplearn.vision.v1 import vision_pb2
from snaplearn_client import VisionClient
from snaplearn_common.metrics import scrape
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import (
    MODEL_NAME,
    Running,
    ServerFactory,
    correctly_classified_images,
    read_events,
    request,
    server_factory,  # noqa: F401 (fixture)
    until,
)

pytestmark = pytest.mark.timeout(120)
CODES = {status.value[0]: status for status in grpc.StatusCode}


def item(item_id: int, classify: vision_pb2.ClassifyRequest, timeout_ms: float = 0.0) -> Any:
    return vision_pb2.ClassifyStreamItem(id=item_id, request=classify, timeout_ms=timeout_ms)


async def read_results(call: Any, count: int) -> dict[int, vision_pb2.ClassifyStreamResult]:
    """The next `count` results, by id; each id answered once."""
    results: dict[int, vision_pb2.ClassifyStreamResult] = {}
    while len(results) < count:
        message = await call.read()
        assert message is not grpc.aio.EOF, f"the stream ended after {sorted(results)}"
        for result in message.results:
            assert result.id not in results, f"item {result.id} answered twice"
            results[result.id] = result
    return results


async def stream_with_a_held_item(running: Running, photo: bytes, item_id: int) -> Any:
    """A ClassifyStream whose item `item_id` is held in the model thread (the gate closed)."""
    await running.gates.hold_next_batch()
    call = running.stub.ClassifyStream()
    await call.write(vision_pb2.ClassifyStreamRequest(items=[item(item_id, request(photo))]))
    await running.gates.wait_batch_held()
    return call


async def test_each_item_gets_classifys_own_answer_and_the_stream_ends_ok(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    running = await server_factory.start()
    photos = correctly_classified_images(server_factory.model_root)
    call = running.stub.ClassifyStream()
    await call.write(
        vision_pb2.ClassifyStreamRequest(
            items=[
                item(1, request(photos["fractions"], user="s-1", request_id="r-1", top_k=2)),
                item(2, request(photos["geometry"], user="s-2", request_id="r-2"), timeout_ms=30_000),
                item(3, request(b"not an image", user="s-3")),
                item(4, request(photos["exponents"], user="s-4", model_name="no-such-model")),
                item(5, request(photos["exponents"], user="")),
            ]
        )
    )
    await call.write(
        vision_pb2.ClassifyStreamRequest(items=[item(6, request(photos["exponents"], user="s-6"))])
    )
    results = await read_results(call, 6)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK

    codes = {item_id: CODES[result.code] for item_id, result in results.items()}
    assert codes == {
        1: grpc.StatusCode.OK,
        2: grpc.StatusCode.OK,
        3: grpc.StatusCode.INVALID_ARGUMENT,
        4: grpc.StatusCode.NOT_FOUND,
        5: grpc.StatusCode.INVALID_ARGUMENT,
        6: grpc.StatusCode.OK,
    }
    first = results[1].response
    assert first.request_id == "r-1" and first.model_name == MODEL_NAME
    assert [score.label for score in first.labels][:1] == ["fractions"] and len(first.labels) == 2
    assert results[2].response.labels[0].label == "geometry"
    assert results[6].response.labels[0].label == "exponents" and results[6].response.request_id
    assert "not a decodable image" in results[3].message
    assert "no-such-model" in results[4].message
    assert "user_id" in results[5].message
    assert all(not results[i].message for i in (1, 2, 6))

    events = read_events(running.bus, 3)
    assert sorted(record.key.decode() for record in events) == ["s-1", "s-2", "s-6"]
    metrics = scrape(running.server.metrics_port)
    assert metrics['snaplearn_vision_request_seconds_count{code="OK"}'] == 3
    assert metrics['snaplearn_vision_errors_total{code="INVALID_ARGUMENT"}'] == 2
    assert metrics['snaplearn_vision_errors_total{code="NOT_FOUND"}'] == 1


async def test_the_stream_names_the_server_process_in_its_headers_at_once(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    # The gateway groups its connections by this name (one stream per worker process).
    running = await server_factory.start()
    first, second = running.stub.ClassifyStream(), running.stub.ClassifyStream()
    # No item sent yet: the headers do not wait for a first answer.
    headers = [dict(await asyncio.wait_for(call.initial_metadata(), 10)) for call in (first, second)]
    names = [h.get("snaplearn-server-instance") for h in headers]
    host_pid, _, suffix = (names[0] or "").rpartition("/")
    assert host_pid == f"{socket.gethostname()}/{os.getpid()}" and len(suffix) == 8, names
    assert names[1] == names[0], "two streams to one process name it differently"
    for call in (first, second):
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_cancelled_and_expired_items_are_answered_at_once_and_never_computed(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    running = await server_factory.start(max_batch_size=1)
    photo = correctly_classified_images(server_factory.model_root)["fractions"]
    gates = running.gates
    call = await stream_with_a_held_item(running, photo, 1)
    await call.write(
        vision_pb2.ClassifyStreamRequest(
            items=[item(2, request(photo)), item(3, request(photo), timeout_ms=50), item(4, request(photo))]
        )
    )
    expired = await read_results(call, 1)
    assert expired[3].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], expired[3]
    await call.write(vision_pb2.ClassifyStreamRequest(cancel_ids=[2]))
    cancelled = await read_results(call, 1)
    assert cancelled[2].code == grpc.StatusCode.CANCELLED.value[0]
    # Both answered while the model thread is still blocked on item 1.
    assert not gates.open.is_set() and gates.batch_sizes == [1]

    gates.open.set()
    rest = await read_results(call, 2)
    assert rest[1].code == 0 and rest[4].code == 0
    assert rest[1].response.labels[0].label == "fractions"
    assert gates.batch_sizes == [1, 1], "the cancelled and the expired item reached the model"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    metrics = scrape(running.server.metrics_port)
    assert metrics['snaplearn_vision_errors_total{code="CANCELLED"}'] == 1
    assert metrics['snaplearn_vision_errors_total{code="DEADLINE_EXCEEDED"}'] == 1


async def test_a_reused_id_or_a_negative_timeout_is_refused_for_that_item_only(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    running = await server_factory.start()
    photo = correctly_classified_images(server_factory.model_root)["geometry"]
    gates = running.gates
    call = await stream_with_a_held_item(running, photo, 7)
    await call.write(
        vision_pb2.ClassifyStreamRequest(
            items=[item(7, request(photo)), item(8, request(photo), timeout_ms=-1)]
        )
    )
    refused = await call.read()
    by_id = {result.id: result for result in refused.results}
    assert len(refused.results) == 2 and set(by_id) == {7, 8}
    assert all(r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in refused.results)
    assert "already in flight" in by_id[7].message and "timeout_ms" in by_id[8].message
    gates.open.set()
    answered = await read_results(call, 1)
    assert answered[7].response.labels[0].label == "geometry"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_the_python_clients_classify_many_returns_one_outcome_per_photo_in_order(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    running = await server_factory.start()
    photos = correctly_classified_images(server_factory.model_root)
    images = [photos["geometry"], b"not an image", photos["fractions"]] + [photos["exponents"]] * 40
    with VisionClient(running.server.target, timeout_s=30) as client:
        outcomes = await asyncio.to_thread(client.classify_many, images, "student-9", 2)
    assert len(outcomes) == len(images)
    assert outcomes[0].ok and outcomes[0].response is not None
    assert outcomes[0].response.labels[0].label == "geometry" and len(outcomes[0].response.labels) == 2
    assert (
        outcomes[1].code == grpc.StatusCode.INVALID_ARGUMENT
        and "not a decodable image" in outcomes[1].message
    )
    assert outcomes[1].response is None
    labels = [outcome.response.labels[0].label for outcome in outcomes[2:] if outcome.response is not None]
    assert labels == ["fractions"] + ["exponents"] * 40
    assert len(read_events(running.bus, 42)) == 42  # one event per photo classified


async def test_a_stopping_server_answers_what_it_started_and_ends_the_stream_ok(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    running = await server_factory.start(max_batch_size=1)
    photo = correctly_classified_images(server_factory.model_root)["fractions"]
    gates = running.gates
    call = await stream_with_a_held_item(running, photo, 1)
    await call.write(vision_pb2.ClassifyStreamRequest(items=[item(2, request(photo))]))
    await until(lambda: running.batcher().queue_depth == 1, "item 2 to queue")

    stopping = asyncio.ensure_future(running.server.stop())
    await asyncio.sleep(0)  # stop() drains the streams before its first await
    await call.write(vision_pb2.ClassifyStreamRequest(items=[item(3, request(photo))]))
    gates.open.set()
    answered = await read_results(call, 2)
    assert set(answered) == {1, 2} and all(result.code == 0 for result in answered.values())
    assert await call.read() is grpc.aio.EOF, "item 3, sent after the drain began, was answered"
    assert await call.code() == grpc.StatusCode.OK
    await stopping
    assert gates.batch_sizes == [1, 1], "item 3 was started"


async def test_a_stream_opened_once_the_drain_began_starts_nothing_and_ends_ok(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    """A stream can open while the server begins stopping (the drain runs during the new
    stream's first await, or a gateway's fresh connection reaches the same draining process
    through the shared port): it must end OK at once, not be cut with items on it at the end of
    the shutdown grace, so that the gateway resends its items elsewhere."""
    running = await server_factory.start(max_batch_size=1)
    photo = correctly_classified_images(server_factory.model_root)["fractions"]
    servicer = running.server._vision_servicer  # what VisionServer.stop() drains first
    assert servicer is not None
    servicer.drain_streams()  # the first step of stop(), alone: the server still accepts calls
    call = running.stub.ClassifyStream()
    await call.write(vision_pb2.ClassifyStreamRequest(items=[item(7, request(photo))]))
    assert await call.read() is grpc.aio.EOF, "item 7, sent to a draining server, was answered"
    assert await call.code() == grpc.StatusCode.OK
    assert running.gates.batch_sizes == [], "item 7 was started"


async def test_an_item_cancelled_in_the_message_that_sends_it_is_answered_and_the_stream_ends_ok(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    """Defect (issue 21): an item whose id is also in the same message's cancel_ids was cancelled
    before its task first ran, so it was never answered and the stream never ended; a stopping
    server then waited its whole grace and the client got UNAVAILABLE instead of an OK end."""
    running = await server_factory.start()
    photo = correctly_classified_images(server_factory.model_root)["fractions"]
    call = running.stub.ClassifyStream()
    await call.write(
        vision_pb2.ClassifyStreamRequest(
            items=[item(1, request(photo)), item(2, request(photo))], cancel_ids=[1]
        )
    )
    answered = await asyncio.wait_for(read_results(call, 2), 20)
    assert answered[1].code == grpc.StatusCode.CANCELLED.value[0], answered[1]
    assert answered[1].message == "the item was cancelled by the client"
    assert answered[2].code == 0 and answered[2].response.labels[0].label == "fractions"
    # A second one, left on the stream when the server stops: the stream still ends OK.
    await call.write(vision_pb2.ClassifyStreamRequest(items=[item(3, request(photo))], cancel_ids=[3]))
    third = await asyncio.wait_for(read_results(call, 1), 20)
    assert third[3].code == grpc.StatusCode.CANCELLED.value[0]
    metrics = scrape(running.server.metrics_port)
    assert metrics['snaplearn_vision_errors_total{code="CANCELLED"}'] == 2
    await asyncio.wait_for(running.server.stop(), 20)
    assert await asyncio.wait_for(call.read(), 20) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
