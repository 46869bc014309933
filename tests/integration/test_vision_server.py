"""The vision server end to end in-process: a real grpc.aio server on port 0, the real small
trained model, a real embedded (SQLite) event bus in tmp_path.

Load is made deterministic with a gate inside the model's predict (GatedModel): a test
holds a batch in the model thread, queues requests behind it, checks what it wants, then
opens the gate. Waiting is on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from snaplearn.vision.v1 import vision_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import decode_image_classified
from snaplearn_common.metrics import scrape
from snaplearn_vision import config as vision_config
from snaplearn_vision.edges.vision import SERVICE_NAME
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import (
    MODEL_NAME,
    MODEL_VERSION,
    Running,
    ServerFactory,
    StartServer,
    correctly_classified_images,
    expect_status,
    read_events,
    request,
    until,
)

pytestmark = pytest.mark.timeout(120)

# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_root(trained_model_repository: Path) -> Path:  # noqa: F811
    return Path(trained_model_repository)


@pytest.fixture
async def start_server(model_root: Path, tmp_path: Path) -> AsyncIterator[StartServer]:
    factory = ServerFactory(model_root, tmp_path)
    yield factory.start
    await factory.close()


@pytest.fixture
async def running(start_server: StartServer) -> Running:
    return await start_server()


@pytest.fixture(scope="module")
def images(model_root: Path) -> dict[str, bytes]:
    return correctly_classified_images(model_root)


# -- tests -------------------------------------------------------------------------------


async def test_classify_returns_the_topic_and_publishes_an_event_without_the_image(
    running: Running, images: dict[str, bytes]
) -> None:
    replies = {}
    for topic, image in images.items():
        replies[topic] = await running.stub.Classify(
            request(image, user=f"student-{topic}", request_id=f"req-{topic}"), timeout=30
        )
    for topic, reply in replies.items():
        assert reply.labels[0].label == topic
        assert reply.request_id == f"req-{topic}"
        assert len(reply.labels) == 5  # top_k 0 means 5
        scores = [label.score for label in reply.labels]
        assert scores == sorted(scores, reverse=True)
        assert 0 < sum(scores) <= 1.0 + 1e-5
        assert (reply.model_name, reply.model_version) == (MODEL_NAME, MODEL_VERSION)
        assert reply.queue_ms >= 0
        assert reply.compute_ms > 0
        assert reply.batch_size >= 1

    records = await asyncio.to_thread(read_events, running.bus, len(images))
    assert len(records) == len(images)
    by_id = {}
    for record in records:
        event = decode_image_classified(record)
        by_id[event.event_id] = event
        raw = record.value + b"".join(value for _, value in record.headers) + (record.key or b"")
        for image in images.values():
            assert image not in raw
            assert image[200:264] not in raw  # not even a slice of it
    for topic, reply in replies.items():
        event = by_id[f"req-{topic}"]
        assert event.user_id == f"student-{topic}"
        assert (event.model_name, event.model_version) == (MODEL_NAME, MODEL_VERSION)
        assert [(label.label, round(label.score, 5)) for label in event.labels] == [
            (label.label, round(label.score, 5)) for label in reply.labels
        ]


async def test_server_generates_a_request_id_and_honours_top_k(
    running: Running, images: dict[str, bytes]
) -> None:
    reply = await running.stub.Classify(request(images["geometry"], top_k=10), timeout=30)
    assert re.fullmatch(r"[0-9a-f-]{36}", reply.request_id)
    assert len(reply.labels) == 10
    assert sum(label.score for label in reply.labels) == pytest.approx(1.0, abs=1e-4)


async def test_invalid_requests_get_clear_errors_and_the_server_keeps_serving(
    running: Running, images: dict[str, bytes]
) -> None:
    good = images["fractions"]
    details = await expect_status(
        running.stub.Classify(request(b"definitely not a jpeg" * 10), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # decoding's own message, or the service's when the decoder raised something else.
    assert "not a decodable image" in details or "image could not be decoded" in details
    details = await expect_status(
        running.stub.Classify(request(good, user="")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "user_id is required" in details
    details = await expect_status(
        running.stub.Classify(request(good, user="x" * 129)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "limit is 128" in details
    details = await expect_status(running.stub.Classify(request(b"")), grpc.StatusCode.INVALID_ARGUMENT)
    assert "image is empty" in details
    details = await expect_status(
        running.stub.Classify(request(good, top_k=11)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "only 10 labels" in details
    details = await expect_status(
        running.stub.Classify(request(good, model_name="no-such-model")), grpc.StatusCode.NOT_FOUND
    )
    assert "no-such-model" in details
    await expect_status(
        running.stub.Classify(request(good, model_name=MODEL_NAME, model_version="99")),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_status(
        running.stub.Classify(request(good, model_name="../etc")), grpc.StatusCode.INVALID_ARGUMENT
    )
    reply = await running.stub.Classify(request(good), timeout=30)
    assert reply.labels[0].label == "fractions"
    # Naming the default model explicitly (version empty = latest) serves the same model.
    reply = await running.stub.Classify(request(good, model_name=MODEL_NAME), timeout=30)
    assert (reply.model_name, reply.model_version) == (MODEL_NAME, MODEL_VERSION)


async def test_tiny_deadline_under_load_is_deadline_exceeded_and_never_computed(
    running: Running, images: dict[str, bytes]
) -> None:
    gates = running.gates
    await gates.hold_next_batch()
    blocking = asyncio.ensure_future(running.stub.Classify(request(images["exponents"]), timeout=60))
    await gates.wait_batch_held()
    assert gates.batch_sizes == [1]
    # Queued behind the held batch, so its 200 ms deadline must pass before compute.
    await expect_status(
        running.stub.Classify(request(images["geometry"]), timeout=0.2), grpc.StatusCode.DEADLINE_EXCEEDED
    )
    await until(lambda: running.batcher().queue_depth == 0, "the expired request left the queue")
    gates.open.set()
    assert (await blocking).labels[0].label == "exponents"
    reply = await running.stub.Classify(request(images["geometry"]), timeout=30)
    assert reply.labels[0].label == "geometry"
    assert gates.batch_sizes == [1, 1]  # the expired request never reached the model


async def test_full_queue_is_resource_exhausted_and_the_server_recovers(
    start_server: StartServer, images: dict[str, bytes]
) -> None:
    running = await start_server(max_batch_size=1, max_queue_size=2)
    gates = running.gates
    await gates.hold_next_batch()
    image = images["fractions"]
    computing = asyncio.ensure_future(running.stub.Classify(request(image), timeout=60))
    await gates.wait_batch_held()
    queued = [asyncio.ensure_future(running.stub.Classify(request(image), timeout=60)) for _ in range(2)]
    await until(lambda: running.batcher().queue_depth == 2, "queue full")
    details = await expect_status(
        running.stub.Classify(request(image), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "queue is full" in details and "retry" in details
    gates.open.set()
    for call in (computing, *queued):
        assert (await call).labels[0].label == "fractions"
    assert (await running.stub.Classify(request(image), timeout=30)).labels[0].label == "fractions"


async def test_concurrent_requests_are_batched(running: Running, images: dict[str, bytes]) -> None:
    gates = running.gates
    await gates.hold_next_batch()
    first = asyncio.ensure_future(running.stub.Classify(request(images["exponents"]), timeout=60))
    await gates.wait_batch_held()
    topics = ["fractions", "geometry", "exponents"] * 3  # 9 requests, max batch size 8
    calls = [
        asyncio.ensure_future(running.stub.Classify(request(images[t], user=f"s{i}"), timeout=60))
        for i, t in enumerate(topics)
    ]
    await until(lambda: running.batcher().queue_depth == len(topics), "all requests queued")
    gates.open.set()
    replies = [await first, *[await call for call in calls]]
    assert [r.labels[0].label for r in replies[1:]] == topics
    assert max(r.batch_size for r in replies) == 8
    assert gates.batch_sizes[:2] == [1, 8]
    assert sum(gates.batch_sizes) == 1 + len(topics)


async def test_health_reflection_and_metrics(running: Running, images: dict[str, bytes]) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)

    async def list_services() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for response in reflection.ServerReflectionInfo(list_services()):
        names |= {service.name for service in response.list_services_response.service}
    assert SERVICE_NAME in names

    for _ in range(3):
        await running.stub.Classify(request(images["geometry"]), timeout=30)
    await expect_status(running.stub.Classify(request(b"garbage")), grpc.StatusCode.INVALID_ARGUMENT)
    samples = await asyncio.to_thread(scrape, running.server.metrics_port)
    model = f'model="{MODEL_NAME}:{MODEL_VERSION}"'
    assert samples['snaplearn_vision_request_seconds_count{code="OK"}'] >= 3
    assert samples['snaplearn_vision_request_seconds_count{code="INVALID_ARGUMENT"}'] >= 1
    assert samples['snaplearn_vision_errors_total{code="INVALID_ARGUMENT"}'] >= 1
    assert samples[f"snaplearn_vision_batch_size_count{{{model}}}"] >= 1
    assert samples[f"snaplearn_vision_queue_wait_seconds_count{{{model}}}"] >= 3
    assert samples[f"snaplearn_vision_batch_compute_seconds_count{{{model}}}"] >= 1
    assert samples[f"snaplearn_vision_queue_depth{{{model}}}"] == 0
    assert samples["snaplearn_vision_in_flight_requests"] == 0
    assert samples["snaplearn_vision_decode_seconds_count"] >= 3


async def test_rejections_are_counted_by_reason(start_server: StartServer, images: dict[str, bytes]) -> None:
    running = await start_server(max_batch_size=1, max_queue_size=1)
    gates = running.gates
    await gates.hold_next_batch()
    computing = asyncio.ensure_future(running.stub.Classify(request(images["geometry"]), timeout=60))
    await gates.wait_batch_held()
    queued = asyncio.ensure_future(running.stub.Classify(request(images["geometry"]), timeout=60))
    await until(lambda: running.batcher().queue_depth == 1, "queue full")
    await expect_status(
        running.stub.Classify(request(images["geometry"])), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    gates.open.set()
    await computing
    await queued
    samples = await asyncio.to_thread(scrape, running.server.metrics_port)
    assert samples['snaplearn_vision_rejections_total{reason="queue_full"}'] == 1
    assert samples['snaplearn_vision_request_seconds_count{code="RESOURCE_EXHAUSTED"}'] == 1


async def test_a_failing_publisher_never_fails_the_request(
    running: Running, images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_publish(topic: str, event: Any) -> bool:
        raise RuntimeError("bus exploded")

    assert running.server.publisher is not None
    monkeypatch.setattr(running.server.publisher, "publish", broken_publish)
    reply = await running.stub.Classify(request(images["geometry"]), timeout=30)
    assert reply.labels[0].label == "geometry"
    monkeypatch.setattr(running.server.publisher, "publish", lambda topic, event: False)  # buffer full
    reply = await running.stub.Classify(request(images["geometry"]), timeout=30)
    assert reply.labels[0].label == "geometry"
    samples = await asyncio.to_thread(scrape, running.server.metrics_port)
    assert samples["snaplearn_vision_event_publish_failures_total"] == 2


async def test_stop_drains_admitted_requests_and_refuses_new_ones(
    running: Running, images: dict[str, bytes]
) -> None:
    gates = running.gates
    service = running.server.service
    assert service is not None
    await gates.hold_next_batch()
    computing = asyncio.ensure_future(running.stub.Classify(request(images["exponents"]), timeout=60))
    await gates.wait_batch_held()
    queued = asyncio.ensure_future(running.stub.Classify(request(images["fractions"]), timeout=60))
    await until(lambda: running.batcher().queue_depth == 1, "second request queued")
    stopping = asyncio.ensure_future(service.stop(drain=True))
    await until(lambda: not service.ready, "service refusing new requests")
    details = await expect_status(
        running.stub.Classify(request(images["geometry"])), grpc.StatusCode.UNAVAILABLE
    )
    assert "shutting down" in details
    assert not stopping.done()  # still waiting for the two admitted requests
    gates.open.set()
    assert (await computing).labels[0].label == "exponents"
    assert (await queued).labels[0].label == "fractions"
    await stopping
    assert gates.batch_sizes == [1, 1]


# -- the real process --------------------------------------------------------------------


@pytest.fixture
def server_process(model_root: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    ready_file = tmp_path / "run" / "vision.json"
    env = {**os.environ, "SNAPLEARN_VISION_DECODE_THREADS": "1"}  # the env fallback path
    process = subprocess.Popen(
        [
            sys.executable, "-m", "snaplearn_vision.main",
            "--port", "0", "--metrics-port", "0",
            "--model-repository", str(model_root), "--device", "cpu",
            "--ready-file", str(ready_file),
            "--bus", "embedded", "--bus-path", str(tmp_path / "bus.db"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )  # fmt: skip
    assert process.stdout is not None
    ready_line = ""
    for line in process.stdout:  # blocks until the line (or EOF if the server dies)
        if line.startswith("vision server ready on"):
            ready_line = line.strip()
            break
    try:
        assert ready_line, f"server exited with {process.poll()} before it was ready"
        yield process, ready_file, ready_line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_main_announces_readiness_serves_and_drains_on_sigterm(
    server_process: tuple[subprocess.Popen[str], Path, str], tmp_path: Path, images: dict[str, bytes]
) -> None:
    process, ready_file, ready_line = server_process
    ports = json.loads(ready_file.read_text())
    assert (
        ready_line == f"vision server ready on 127.0.0.1:{ports['port']} (metrics :{ports['metrics_port']})"
    )
    assert ports["pid"] == process.pid
    with grpc.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
        reply = vision_pb2_grpc.VisionServiceStub(channel).Classify(
            request(images["geometry"], user="student-main"), timeout=30
        )
    assert reply.labels[0].label == "geometry"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert not ready_file.exists()
    with SqliteEventBus(tmp_path / "bus.db") as bus:
        records = read_events(bus, 1)  # flushed before exit
    assert [decode_image_classified(r).user_id for r in records] == ["student-main"]


# -- settings ------------------------------------------------------------------------------


def test_settings_come_from_flags_then_environment_then_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPLEARN_VISION_PORT", "6000")
    monkeypatch.setenv("SNAPLEARN_VISION_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("SNAPLEARN_BUS_PATH", "/tmp/elsewhere.db")
    settings = vision_config.settings_from_args(["--port", "7000", "--max-queue-delay-ms", "3.5"])
    assert settings.port == 7000  # the flag wins over the environment
    assert settings.max_batch_size == 16  # the environment fills in
    assert settings.max_queue_delay_ms == 3.5
    assert settings.metrics_port == vision_config.DEFAULT_METRICS_PORT
    assert settings.model_repository == Path("var/models")
    assert settings.bus is not None and settings.bus.embedded_path == "/tmp/elsewhere.db"
    monkeypatch.delenv("SNAPLEARN_VISION_MAX_BATCH_SIZE")
    defaults = vision_config.settings_from_args([])
    assert (defaults.max_batch_size, defaults.max_queue_delay_ms) == (None, None)  # the model's own


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "70000"],
        ["--max-batch-size", "0"],
        ["--decode-threads", "0"],
        ["--device", "tpu"],
    ],
)
def test_invalid_settings_are_refused_with_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        vision_config.settings_from_args(argv)
    assert exited.value.code == 2


def test_max_connection_age_from_flag_or_environment_0_is_never(monkeypatch: pytest.MonkeyPatch) -> None:
    assert vision_config.settings_from_args([]).max_connection_age_s is None
    assert vision_config.settings_from_args(["--max-connection-age", "0"]).max_connection_age_s is None
    monkeypatch.setenv("SNAPLEARN_VISION_MAX_CONNECTION_AGE_S", "300")
    assert vision_config.settings_from_args([]).max_connection_age_s == 300.0
    assert vision_config.settings_from_args(["--max-connection-age", "60"]).max_connection_age_s == 60.0
