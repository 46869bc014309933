"""Pseudonymous user ids end to end (D54): a real vision server and a real recommender (role trainer,
so it writes snapshot files too; gRPC on port 0) sharing one embedded bus, both given the same key.

A student's photos (Classify, a ClassifyStream item, an Open Inference Protocol call) and an
attempt (RecordFeedback) reach their recommendations, every RPC works by the id the student's
app sends and answers in it, and no event on the bus, no snapshot and no checkpoint file holds
that id's bytes; ForgetStudent by the same id removes the pseudonym from every file too. Without
a key the id travels as sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc import aio
from pydantic import SecretStr

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC, decode_event
from snaplearn_common.pseudonym import UserIds
from snaplearn_common.pseudonym_settings import PseudonymSettings
from snaplearn_common.records import Record
from snaplearn_recommender.trainer import TrainerApp
from snaplearn_vision import config as vision_config
from snaplearn_vision.edges.oip import INPUT_NAME
from snaplearn_vision.server import VisionServer
from tests.helpers.recommender import in_process_settings
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import MODEL_NAME, GatedModels, Gates, correctly_classified_images

pytestmark = pytest.mark.timeout(420)  # with the session model trained first on a busy box

KEY = "a-pseudonym-key-for-this-test-only-0123"
# Distinctive bytes, so that a grep over the files cannot match anything else.
RAW = "school-a/zed-raw-7Q3vX"
REST = RAW.split("/", 1)[1]
WAIT_S = 30.0
Stub = recommender_pb2_grpc.RecommenderServiceStub


@pytest.fixture(scope="module")
def model_root(trained_model_repository: Path) -> Path:  # noqa: F811
    return Path(trained_model_repository)


@pytest.fixture(scope="module")
def photos(model_root: Path) -> dict[str, bytes]:
    return correctly_classified_images(model_root)


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


def _key(on: bool) -> PseudonymSettings:
    return PseudonymSettings(pseudonym_key=SecretStr(KEY)) if on else PseudonymSettings()


async def _vision(model_root: Path, bus: SqliteEventBus, on: bool) -> VisionServer:
    settings = vision_config.VisionSettings.from_env(
        {},
        port=0,
        metrics_port=0,
        model_repository=model_root,
        device="cpu",
        max_queue_delay_ms=2.0,
        decode_threads=1,
        shutdown_grace_s=2.0,
        spool_dir=None,
        pseudonym=_key(on),
    )
    server = VisionServer(settings, models=GatedModels(model_root, Gates()), bus=bus)
    await server.start()
    return server


async def _trainer(tmp_path: Path, bus: SqliteEventBus, on: bool) -> TrainerApp:
    settings = in_process_settings(
        tmp_path / "checkpoints",
        role="trainer",
        snapshot_dir=str(tmp_path / "snapshots"),
        publish_interval_s=0.05,
        pseudonym=_key(on),
    )
    return await TrainerApp.start(settings, bus)


async def _photos_from_every_edge(server: VisionServer, photo: bytes) -> None:
    """One photo each by Classify, a ClassifyStream item and ModelInfer naming the user."""
    async with aio.insecure_channel(server.target) as channel:
        vision = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.ClassifyRequest(user_id=RAW, image=photo, request_id="by-classify")
        assert (await vision.Classify(request, timeout=30)).labels[0].label == "fractions"
        stream = vision.ClassifyStream()
        item_request = vision_pb2.ClassifyRequest(user_id=RAW, image=photo, request_id="by-stream")
        await stream.write(
            vision_pb2.ClassifyStreamRequest(
                items=[vision_pb2.ClassifyStreamItem(id=1, request=item_request)]
            )
        )
        answer = await asyncio.wait_for(stream.read(), 30)
        assert answer.results[0].response.labels[0].label == "fractions", answer
        await stream.done_writing()
    client = triton_aio.InferenceServerClient(server.target)
    try:
        tensor = triton.InferInput(INPUT_NAME, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[photo]], dtype=np.object_))
        await client.infer(
            MODEL_NAME, [tensor], request_id="by-oip", parameters={"user_id": RAW}, client_timeout=30
        )
    finally:
        await client.close()


async def _wait_applied(stub: Stub, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    request = recommender_pb2.RecommendRequest(user_id="probe", k=1)
    while (applied := (await stub.Recommend(request, timeout=5)).events_applied) < count:
        assert time.monotonic() < deadline, f"{applied} of {count} events applied within {WAIT_S} s"
        await asyncio.sleep(0.02)


def _records(bus: SqliteEventBus) -> list[Record]:
    """Every record on the student topic, read from the start by a fresh group."""
    records: list[Record] = []
    with bus.consumer(f"grep-{time.monotonic_ns()}", [IMAGE_CLASSIFIED_TOPIC]) as consumer:
        while batch := consumer.poll(timeout_s=0.5):
            records.extend(batch)
    return records


def _raw_bytes(record: Record) -> bytes:
    return (record.key or b"") + record.value + b"".join(k.encode() + v for k, v in record.headers)


def _user_id(record: Record) -> str:
    message: Any = decode_event(record)
    return str(message.user_id)


def _files_holding(tmp_path: Path, needle: str) -> list[str]:
    roots = [tmp_path / "checkpoints", tmp_path / "snapshots"]
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]
    assert files, "no checkpoint or snapshot file to look into"
    return [str(p.relative_to(tmp_path)) for p in files if needle.encode() in p.read_bytes()]


async def test_with_a_key_the_raw_id_is_in_no_event_snapshot_or_checkpoint_and_every_rpc_takes_it(
    bus: SqliteEventBus, tmp_path: Path, model_root: Path, photos: dict[str, bytes]
) -> None:
    pseudonym = UserIds(KEY.encode()).internal(RAW)
    assert pseudonym.startswith("school-a/") and REST not in pseudonym
    vision = await _vision(model_root, bus, on=True)
    app = await _trainer(tmp_path, bus, on=True)
    try:
        await _photos_from_every_edge(vision, photos["fractions"])
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            feedback = recommender_pb2.RecordFeedbackRequest(
                user_id=RAW,
                item_id="fractions-002",
                kind=recommender_pb2.FEEDBACK_KIND_COMPLETED,
                outcome=recommender_pb2.ATTEMPT_OUTCOME_CORRECT,
            )
            assert (await stub.RecordFeedback(feedback, timeout=5)).accepted
            await _wait_applied(stub, 4)

            # The vision server's photos and the attempt reached the same student.
            recommended = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=RAW, k=5), timeout=5)
            assert not recommended.cold_start and recommended.user_id == RAW
            state = await stub.GetStudentState(recommender_pb2.GetStudentStateRequest(user_id=RAW), timeout=5)
            assert state.user_id == RAW
            assert [a.item_id for a in state.recent_attempts] == ["fractions-002"]
            # One student, under the pseudonym both servers computed alike.
            assert set(app.service.snapshot.user_index) == {pseudonym}

            # No record on the bus holds the raw id (nor its part after the tenant).
            records = await asyncio.to_thread(_records, bus)
            assert len(records) == 4
            assert sorted(_user_id(r) for r in records) == [pseudonym] * 4
            assert {r.key for r in records} == {pseudonym.encode()}
            assert [r for r in records if REST.encode() in _raw_bytes(r)] == []
    finally:
        await vision.stop()
        await app.stop()  # a checkpoint and the last snapshot
    assert _files_holding(tmp_path, REST) == []
    assert _files_holding(tmp_path, pseudonym)  # the same grep finds the student's pseudonym

    # Forget by the raw id: the tombstone names the pseudonym; every file loses it.
    app = await _trainer(tmp_path, bus, on=True)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            forget = recommender_pb2.ForgetStudentRequest(user_id=RAW, request_id="forget-1")
            assert (await stub.ForgetStudent(forget, timeout=5)).accepted
            await _wait_applied(stub, 5)
            after = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=RAW, k=5), timeout=5)
            assert after.cold_start and after.user_id == RAW
            with pytest.raises(aio.AioRpcError) as missing:
                await stub.GetStudentState(recommender_pb2.GetStudentStateRequest(user_id=RAW), timeout=5)
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
            assert repr(RAW) in (missing.value.details() or "") and pseudonym not in (
                missing.value.details() or ""
            )
    finally:
        await app.stop()
    *_, tombstone = records = await asyncio.to_thread(_records, bus)
    assert len(records) == 5 and tombstone.header("event-type") == b"snaplearn.events.v1.StudentForgotten"
    assert _user_id(tombstone) == pseudonym and REST.encode() not in _raw_bytes(tombstone)
    assert _files_holding(tmp_path, pseudonym) == []  # older snapshot versions were pruned (D48)
    assert _files_holding(tmp_path, REST) == []


async def test_without_a_key_the_id_travels_as_sent(
    bus: SqliteEventBus, tmp_path: Path, model_root: Path, photos: dict[str, bytes]
) -> None:
    vision = await _vision(model_root, bus, on=False)
    app = await _trainer(tmp_path, bus, on=False)
    try:
        await _photos_from_every_edge(vision, photos["fractions"])
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            await _wait_applied(stub, 3)
            recommended = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=RAW, k=5), timeout=5)
            assert not recommended.cold_start and recommended.user_id == RAW
            assert RAW in app.service.snapshot.user_index
        records = await asyncio.to_thread(_records, bus)
        assert sorted(_user_id(r) for r in records) == [RAW] * 3
        assert {r.key for r in records} == {RAW.encode()}
    finally:
        await vision.stop()
        await app.stop()
    assert _files_holding(tmp_path, RAW)
