"""A real vision server in-process for integration tests: the small trained model behind a gate.

Load is made deterministic with a gate inside the model's batch function (GatedModel): a test
holds a batch in the model thread, queues requests behind it, checks what it wants, then
opens the gate. Waiting is on conditions, never on fixed sleeps.

A test module wraps ServerFactory and correctly_classified_images in its own fixtures
(see tests/integration/test_vision_server.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_common.eventbus.base import Record
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC
from snaplearn_vision import config as vision_config
from snaplearn_vision import schema
from snaplearn_vision.runtime.model_repository import ModelRepository
from snaplearn_vision.server import VisionServer
from snaplearn_vision.worksheets import sample_image_bytes

MODEL_NAME = schema.DEFAULT_MODEL_NAME
MODEL_VERSION = schema.DEFAULT_MODEL_VERSION
GATE_TIMEOUT_S = 60.0


# -- a gate inside the model thread ------------------------------------------------------


class GatedModel:
    """Wraps the real model; predict waits for the gate and records batch sizes."""

    def __init__(self, model: Any, gates: Gates) -> None:
        self._model = model
        self._gates = gates

    def __getattr__(self, name: str) -> Any:  # name, version, labels, config, decode_pixels, top_k
        return getattr(self._model, name)

    def warm_up(self, **options: Any) -> Any:
        return self._model.warm_up(**options)  # not gated: start-up must not wait for a test

    def predict_pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self._gates.batch_sizes.append(len(images))
        self._gates.entered.set()
        if not self._gates.open.wait(GATE_TIMEOUT_S):
            raise TimeoutError("test gate never opened")
        return np.asarray(self._model.predict_pixels(images))


@dataclass
class Gates:
    open: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.open.set()  # open unless a test closes it

    async def hold_next_batch(self) -> None:
        self.open.clear()
        self.entered.clear()

    async def wait_batch_held(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, GATE_TIMEOUT_S), "no batch reached the model"


@dataclass
class GatedModels:
    """A ModelSource: the real repository, each loaded model wrapped in a GatedModel."""

    root: Path
    gates: Gates

    def load(self, name: str, version: str | None = None) -> Any:
        return GatedModel(ModelRepository(self.root).load(name, version or None, device="cpu"), self.gates)


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Running:
    server: VisionServer
    stub: vision_pb2_grpc.VisionServiceStub
    channel: aio.Channel
    bus: SqliteEventBus
    gates: Gates

    def batcher(self) -> Any:
        assert self.server.service is not None
        batcher = self.server.service.batcher_for(MODEL_NAME, MODEL_VERSION)
        assert batcher is not None
        return batcher


StartServer = Callable[..., Awaitable[Running]]


class ServerFactory:
    """Starts VisionServers (real gRPC on port 0, gated real model, embedded bus in tmp_path)."""

    def __init__(self, model_root: Path, tmp_path: Path) -> None:
        self.model_root = model_root
        self.tmp_path = tmp_path
        self.started: list[Running] = []

    async def start(self, **overrides: Any) -> Running:
        values: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "model_repository": self.model_root,
            "device": "cpu",
            "max_batch_size": 8,
            "max_queue_delay_ms": 2.0,
            "decode_threads": 2,
            "shutdown_grace_s": 2.0,
            "spool_dir": None,  # events the bus cannot take wait in memory
        }
        # The environment left out ({}): what a test sets is all there is.
        settings = vision_config.VisionSettings.from_env({}, **{**values, **overrides})
        gates = Gates()
        bus = SqliteEventBus(self.tmp_path / f"bus-{len(self.started)}.db")
        server = VisionServer(settings, models=GatedModels(self.model_root, gates), bus=bus)
        await server.start()
        channel = aio.insecure_channel(server.target)
        running = Running(server, vision_pb2_grpc.VisionServiceStub(channel), channel, bus, gates)
        self.started.append(running)
        return running

    async def close(self) -> None:
        for running in self.started:
            running.gates.open.set()
            await running.channel.close()
            await running.server.stop()
            running.bus.close()


def correctly_classified_images(model_root: Path) -> dict[str, bytes]:
    """One rendered photo per topic that the model, run offline, gets right.

    The small test model is not perfect; the server must agree with the model, so the
    tests use photos whose right answer is known.
    """
    model = ModelRepository(model_root).load(MODEL_NAME, MODEL_VERSION, device="cpu")
    chosen: dict[str, bytes] = {}
    for topic in ("fractions", "geometry", "exponents"):
        for seed in range(50):
            image = sample_image_bytes(topic, seed=seed)
            if model.classify(image, k=1)[0][0] == topic:
                chosen[topic] = image
                break
        else:
            pytest.fail(f"the test model misclassifies 50 rendered {topic} photos")
    return chosen


def request(image: bytes, user: str = "student-1", **fields: Any) -> vision_pb2.ClassifyRequest:
    return vision_pb2.ClassifyRequest(user_id=user, image=image, **fields)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll a condition (bounded) while the server's threads make progress."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)


async def expect_status(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    with pytest.raises(aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details() or ""


def read_events(bus: SqliteEventBus, expected: int, timeout_s: float = 20.0) -> list[Record]:
    records: list[Record] = []
    with bus.consumer(f"test-{time.monotonic_ns()}", [IMAGE_CLASSIFIED_TOPIC]) as consumer:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer.poll(timeout_s=0.2))
    return records


@pytest.fixture
async def server_factory(trained_model_repository: Path, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """A ServerFactory over the session's small trained model; closes what it started. Import
    it together with trained_model_repository (tests.helpers.vision_model)."""
    servers = ServerFactory(Path(trained_model_repository), tmp_path)
    yield servers
    await servers.close()
