"""services/gateway (snaplearn-gateway) in front of a real vision server (gRPC on port 0, the small
trained model behind a gate): answers, errors and health pass through unchanged, and inference
calls beyond --max-in-flight are refused by the gateway before our server sees them.

The gateway is built with `go build` (as benchmarks/vision_bench.py does); its Go unit tests
(`go test ./...` in services/gateway) run here too, since CI runs pytest.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snaplearn.vision.v1 import vision_pb2_grpc
from snaplearn_common.metrics import scrape
from tests.helpers.gateway import gateway_processes
from tests.helpers.go_build import BUILD_TIMEOUT_S, GO_COMMANDS, build_go_command, go_or_skip
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)
from tests.helpers.vision_server import (
    ServerFactory,
    correctly_classified_images,
    expect_status,
    request,
    server_factory,  # noqa: F401  (fixture)
    until,
)
from tests.integration.test_vision_workers import OK_REQUESTS, start_supervisor, wait_for

# start_gateway(backend target, max in flight) -> (gateway target, gateway metrics port)
StartGateway = Callable[[str, int], tuple[str, int]]
GATEWAY_BACKEND_CONNECTIONS = 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 120)]


@pytest.fixture(scope="module")
def gateway_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_command("snaplearn-gateway", tmp_path_factory.mktemp("gateway"))


@pytest.fixture(scope="module")
def images(trained_model_repository: Path) -> dict[str, bytes]:  # noqa: F811
    return correctly_classified_images(Path(trained_model_repository))


@pytest.fixture
def start_gateway(gateway_binary: Path, tmp_path: Path) -> Iterator[StartGateway]:
    with gateway_processes(gateway_binary, tmp_path) as start_gateway:

        def start(backend: str, max_in_flight: int) -> tuple[str, int]:
            port, metrics_port = start_gateway(
                [
                    "--backend", backend, "--max-in-flight", str(max_in_flight),
                    "--backend-connections", str(GATEWAY_BACKEND_CONNECTIONS),
                ]
            )  # fmt: skip
            return f"127.0.0.1:{port}", metrics_port

        yield start


def test_the_gateways_go_unit_tests_pass() -> None:
    tested = subprocess.run(
        [go_or_skip("the gateway's Go tests cannot run"), "test", "-count=1", "./..."],
        cwd=GO_COMMANDS["snaplearn-gateway"][0],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.startswith("ok"), tested.stdout


async def test_answers_errors_and_health_pass_through_and_excess_calls_are_refused_by_the_gateway(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    start_gateway: StartGateway,
    images: dict[str, bytes],
) -> None:
    running = await server_factory.start(max_batch_size=1)
    target, gateway_metrics = start_gateway(running.server.target, 2)
    async with aio.insecure_channel(target) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        reply = await stub.Classify(request(images["geometry"], user="via-gateway", top_k=2), timeout=30)
        assert reply.labels[0].label == "geometry" and len(reply.labels) == 2
        message = await expect_status(
            stub.Classify(request(b""), timeout=30), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "image" in message  # our server's own message, unchanged
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="snaplearn.vision.v1.VisionService"), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # Two calls in flight (one held in the model, one queued behind it) fill the gateway.
        served_before = scrape(running.server.metrics_port).get(
            'snaplearn_vision_request_seconds_count{code="OK"}'
        )
        await running.gates.hold_next_batch()
        held = [
            asyncio.ensure_future(stub.Classify(request(images["fractions"], user=f"held-{i}"), timeout=60))
            for i in range(2)
        ]
        await running.gates.wait_batch_held()
        await until(lambda: running.batcher().queue_depth == 1, "the second call to queue behind the first")
        message = await expect_status(
            stub.Classify(request(images["fractions"], user="refused"), timeout=30),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert "--max-in-flight" in message  # the gateway's refusal, not our queue's
        running.gates.open.set()
        assert [(await call).labels[0].label for call in held] == ["fractions", "fractions"]

    server = scrape(running.server.metrics_port)
    assert (
        server['snaplearn_vision_request_seconds_count{code="OK"}'] == served_before + 2
    )  # never saw "refused"
    assert 'snaplearn_vision_errors_total{code="RESOURCE_EXHAUSTED"}' not in server
    gateway = scrape(gateway_metrics)
    assert gateway["snaplearn_gateway_refused_total"] == 1
    assert gateway['snaplearn_gateway_requests_total{code="OK"}'] == 3
    assert gateway['snaplearn_gateway_requests_total{code="INVALID_ARGUMENT"}'] == 1
    assert gateway["snaplearn_gateway_in_flight"] == 0
    # Every forwarded call is timed, in the gateway and at the backend; the refused one is not.
    for histogram in (
        "snaplearn_gateway_request_seconds",
        "snaplearn_gateway_backend_seconds",
        "snaplearn_gateway_own_seconds",
    ):
        assert gateway[f"{histogram}_count"] == 4
        assert gateway[f'{histogram}_bucket{{le="+Inf"}}'] == 4
    # A call's time is the backend's plus the gateway's own, call by call.
    whole, backend, own = (
        gateway[f"snaplearn_gateway_{part}_seconds_sum"] for part in ("request", "backend", "own")
    )
    assert whole == pytest.approx(backend + own) and backend > 0 and own > 0
    # The calls were items of the gateway's ClassifyStreams (one per backend connection).
    assert 1 <= gateway["snaplearn_gateway_classify_streams_opened_total"] <= GATEWAY_BACKEND_CONNECTIONS


async def test_a_callers_deadline_and_cancellation_reach_the_server_through_the_stream(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    start_gateway: StartGateway,
    images: dict[str, bytes],
) -> None:
    """Through the gateway, a call is an item of its ClassifyStream: the caller's deadline
    travels with the item and a cancelled call's id follows, so neither is computed."""
    running = await server_factory.start(max_batch_size=1)
    target, gateway_metrics = start_gateway(running.server.target, 8)
    photo = images["exponents"]
    async with aio.insecure_channel(target) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        await running.gates.hold_next_batch()
        held = asyncio.ensure_future(stub.Classify(request(photo, user="held"), timeout=60))
        await running.gates.wait_batch_held()

        def server_errors() -> dict[str, float]:
            metrics = scrape(running.server.metrics_port)
            return {
                code: metrics.get(f'snaplearn_vision_errors_total{{code="{code}"}}', 0.0)
                for code in ("DEADLINE_EXCEEDED", "CANCELLED")
            }

        with pytest.raises(aio.AioRpcError) as expired:
            await stub.Classify(request(photo, user="expires"), timeout=0.3)
        # The caller's own timer answers DEADLINE_EXCEEDED; on a loaded machine the gateway's
        # reset of the expired stream (grpc-go: RST_STREAM CANCEL) can be read first and surface
        # as CANCELLED. Either way the deadline ended it: the server and the gateway count it as
        # DEADLINE_EXCEEDED (asserted below), and the explicitly cancelled call as CANCELLED.
        assert expired.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        if expired.value.code() == grpc.StatusCode.CANCELLED:
            assert "RST_STREAM" in (expired.value.details() or ""), expired.value.details()
        await until(
            lambda: server_errors() == {"DEADLINE_EXCEEDED": 1.0, "CANCELLED": 0.0},
            "the server to expire the item by its own deadline",
        )
        await until(lambda: running.batcher().queue_depth == 0, "the expired item to leave the queue")
        cancelled = asyncio.ensure_future(stub.Classify(request(photo, user="cancelled"), timeout=60))
        await until(lambda: running.batcher().queue_depth == 1, "the cancelled-to-be call to queue")
        cancelled.cancel()
        await until(
            lambda: server_errors() == {"DEADLINE_EXCEEDED": 1.0, "CANCELLED": 1.0},
            "the server to drop the cancelled item",
        )
        assert running.batcher().queue_depth == 0 and not running.gates.open.is_set()
        running.gates.open.set()
        assert (await held).labels[0].label == "exponents"
    assert running.gates.batch_sizes == [1], "the expired or the cancelled call reached the model"
    gateway = scrape(gateway_metrics)
    assert 1 <= gateway["snaplearn_gateway_classify_streams_opened_total"] <= GATEWAY_BACKEND_CONNECTIONS
    assert gateway['snaplearn_gateway_requests_total{code="DEADLINE_EXCEEDED"}'] == 1
    assert gateway['snaplearn_gateway_requests_total{code="CANCELLED"}'] == 1


def test_a_worker_restarting_behind_the_gateway_costs_no_call(
    trained_model_repository: Path,  # noqa: F811
    tmp_path: Path,
    start_gateway: StartGateway,
    images: dict[str, bytes],
) -> None:
    """`--workers 2` behind the gateway; the worker serving calls is sent SIGTERM mid-traffic:
    it answers the stream items it started and ends its streams, the gateway resends the rest on
    fresh streams (to the other worker), the supervisor restarts it, and every call ends OK."""
    process = start_supervisor(Path(trained_model_repository), tmp_path)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("vision server ready on"), f"exited {process.poll()}"
        ready_file = tmp_path / "run" / "vision.json"
        ready = json.loads(ready_file.read_text())
        target, _ = start_gateway(f"127.0.0.1:{ready['port']}", 64)
        codes: list[grpc.StatusCode] = []
        failures: list[str] = []  # their messages, to tell where a failure came from
        stop = threading.Event()

        def caller(user: str) -> None:
            with grpc.insecure_channel(target) as channel:
                stub = vision_pb2_grpc.VisionServiceStub(channel)
                while not stop.is_set():
                    try:
                        stub.Classify(request(images["geometry"], user=user), timeout=30)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as error:
                        codes.append(error.code())
                        failures.append(f"{error.code().name}: {error.details()}")

        callers = [threading.Thread(target=caller, args=(f"student-{i}",)) for i in range(4)]
        for thread in callers:
            thread.start()
        try:
            wait_for(lambda: len(codes) >= 40, "40 calls through the gateway")
            busiest = max(ready["workers"], key=lambda w: scrape(w["metrics_port"]).get(OK_REQUESTS, 0.0))
            os.kill(busiest["pid"], signal.SIGTERM)

            def restarted() -> bool:
                workers = json.loads(ready_file.read_text())["workers"]
                return workers[busiest["index"]]["pid"] != busiest["pid"]

            wait_for(restarted, "the supervisor to restart the worker")
            after = len(codes)
            wait_for(lambda: len(codes) >= after + 40, "40 more calls after the restart")
        finally:
            stop.set()
            for thread in callers:
                thread.join(timeout=60)
        failed = [code for code in codes if code != grpc.StatusCode.OK]
        assert not failed, f"{len(failed)} of {len(codes)} calls failed: {sorted(set(failures))}"
    finally:
        process.terminate()
        process.wait(timeout=60)
