"""Overload, cancellation and deadlines through real gRPC calls (the unit tests cover the batcher).

The model is held behind a gate (tests/helpers/vision_server.py), so "at once" and "never
computed" are shown by order of events, not by timings: refusals and cancellations complete
while the model thread is still blocked, and the gate's record of batch sizes shows what
reached the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from snaplearn_common.metrics import scrape
from snaplearn_vision.config import VisionSettings
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import (
    MODEL_NAME,
    MODEL_VERSION,
    Running,
    ServerFactory,
    StartServer,
    correctly_classified_images,
    request,
    until,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model_root(trained_model_repository: Path) -> Path:  # noqa: F811
    return Path(trained_model_repository)


@pytest.fixture(scope="module")
def photo(model_root: Path) -> bytes:
    return correctly_classified_images(model_root)["fractions"]


@pytest.fixture
async def start_server(model_root: Path, tmp_path: Path) -> AsyncIterator[StartServer]:
    factory = ServerFactory(model_root, tmp_path)
    yield factory.start
    await factory.close()


def metric(running: Running, name: str) -> float:
    return scrape(running.server.metrics_port).get(name, 0.0)


MODEL_LABEL = f'model="{MODEL_NAME}:{MODEL_VERSION}"'


async def test_a_burst_beyond_the_queue_is_refused_while_the_model_is_still_busy(
    start_server: StartServer, photo: bytes
) -> None:
    running = await start_server(max_batch_size=1, max_queue_size=4)
    gates = running.gates
    await gates.hold_next_batch()
    computing = asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60))
    await gates.wait_batch_held()

    burst = [asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60)) for _ in range(20)]
    await until(lambda: sum(call.done() for call in burst) == 16, "16 of the burst answered")
    # Every refusal came back while the model thread is still blocked on the first request.
    assert not gates.open.is_set() and not computing.done()
    refused = [call for call in burst if call.done()]
    assert all(call.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in refused)  # type: ignore[union-attr]
    assert running.batcher().queue_depth == 4
    assert metric(running, f"snaplearn_vision_queue_depth{{{MODEL_LABEL}}}") == 4
    assert metric(running, f"snaplearn_vision_queue_capacity{{{MODEL_LABEL}}}") == 4
    assert metric(running, f"snaplearn_vision_computing_requests{{{MODEL_LABEL}}}") == 1
    assert metric(running, 'snaplearn_vision_rejections_total{reason="queue_full"}') == 16

    gates.open.set()
    accepted = [call for call in burst if not call.done()]
    for call in (computing, *accepted):
        assert (await call).labels[0].label == "fractions"
    assert gates.batch_sizes == [1] * 5  # the refused 16 never reached the model


async def test_a_refusal_carries_its_status_message_and_is_counted_by_code(
    start_server: StartServer, photo: bytes
) -> None:
    # The servicer answers domain errors itself (the overload fast path): the client must see
    # exactly what the interceptor's mapping would have given, and the metrics must count it.
    running = await start_server(max_batch_size=1, max_queue_size=1)
    gates = running.gates
    await gates.hold_next_batch()
    computing = asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60))
    await gates.wait_batch_held()
    queued = asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60))
    await until(lambda: running.batcher().queue_depth == 1, "one request queued")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.Classify(request(photo), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full (1 requests waiting); retry with backoff" in (refused.value.details() or "")
    assert metric(running, 'snaplearn_vision_errors_total{code="RESOURCE_EXHAUSTED"}') == 1
    assert metric(running, 'snaplearn_vision_request_seconds_count{code="RESOURCE_EXHAUSTED"}') == 1

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await running.stub.Classify(request(b""), timeout=60)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image is empty" in (invalid.value.details() or "")

    gates.open.set()
    for call in (computing, queued):
        assert (await call).labels[0].label == "fractions"


async def test_a_cancelled_call_leaves_the_queue_before_compute(
    start_server: StartServer, photo: bytes
) -> None:
    running = await start_server(max_batch_size=4, max_queue_size=8)
    gates = running.gates
    await gates.hold_next_batch()
    computing = asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60))
    await gates.wait_batch_held()

    # Raw call objects: cancel() cancels the RPC on the wire, as a client going away does.
    kept = running.stub.Classify(request(photo, user="stays"), timeout=60)
    abandoned = running.stub.Classify(request(photo, user="leaves"), timeout=60)
    await until(lambda: running.batcher().queue_depth == 2, "two requests queued")
    abandoned.cancel()
    # The server-side handler is cancelled by gRPC and takes its request out of the queue,
    # while the model is still busy: its slot is free before any batch could have taken it.
    await until(lambda: running.batcher().queue_depth == 1, "the cancelled request left the queue")
    await until(
        lambda: metric(running, 'snaplearn_vision_rejections_total{reason="cancelled"}') == 1, "counted"
    )
    assert running.batcher().stats.cancelled == 1 and not gates.open.is_set()

    gates.open.set()
    assert (await computing).labels[0].label == "fractions"
    assert (await kept).labels[0].label == "fractions"
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert gates.batch_sizes == [1, 1]  # the abandoned request was never computed


async def test_requests_whose_deadline_passes_in_the_queue_are_never_computed(
    start_server: StartServer, photo: bytes
) -> None:
    running = await start_server(max_batch_size=4, max_queue_size=8)
    gates = running.gates
    await gates.hold_next_batch()
    computing = asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60))
    await gates.wait_batch_held()
    short = [asyncio.ensure_future(running.stub.Classify(request(photo), timeout=0.3)) for _ in range(3)]
    patient = asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60))
    await until(lambda: all(call.done() for call in short), "the short deadlines passed")
    assert all(call.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED for call in short)  # type: ignore[union-attr]

    gates.open.set()
    assert (await computing).labels[0].label == "fractions"
    assert (await patient).labels[0].label == "fractions"
    assert gates.batch_sizes == [1, 1]  # only the patient one joined the second batch
    assert running.batcher().queue_depth == 0


async def test_over_grpcs_cap_a_call_is_refused_at_once_before_our_admission(
    start_server: StartServer, photo: bytes
) -> None:
    # An explicit cap of 3 calls in flight, below what our queue would admit: the fourth call is
    # refused by grpc itself while the model is still blocked, and never reaches our code.
    running = await start_server(max_batch_size=1, max_queue_size=4, max_concurrent_rpcs=3)
    assert running.server.settings.rpc_cap() == 3
    gates = running.gates
    await gates.hold_next_batch()
    computing = asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60))
    await gates.wait_batch_held()
    queued = [asyncio.ensure_future(running.stub.Classify(request(photo), timeout=60)) for _ in range(2)]
    await until(lambda: running.batcher().queue_depth == 2, "two requests queued")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.Classify(request(photo), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == "Concurrent RPC limit exceeded!"  # grpc's words, not ours
    assert not gates.open.is_set() and not computing.done()
    assert metric(running, 'snaplearn_vision_rejections_total{reason="queue_full"}') == 0
    assert metric(running, 'snaplearn_vision_errors_total{code="RESOURCE_EXHAUSTED"}') == 0

    gates.open.set()
    for call in (computing, *queued):
        assert (await call).labels[0].label == "fractions"
    # Capacity is back once the calls finished.
    assert (await running.stub.Classify(request(photo), timeout=60)).labels[0].label == "fractions"


def test_the_derived_cap_sits_above_what_our_admission_lets_in() -> None:
    settings = VisionSettings(max_queue_size=256, max_batch_size=32, max_concurrent_rpcs=None)
    assert settings.rpc_cap() == 256 + 2 * 32 + 32
    assert VisionSettings(max_concurrent_rpcs=0).rpc_cap() is None
