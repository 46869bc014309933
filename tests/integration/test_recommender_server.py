"""The recommender end to end in one process: real SqliteEventBus, worker thread, grpc.aio server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import (
    HEADER_EVENT_TYPE,
    HEADER_SCHEMA_VERSION,
    IMAGE_CLASSIFIED_TOPIC,
    IMAGE_CLASSIFIED_TYPE,
    SCHEMA_VERSION,
)
from snaplearn_recommender.servicer import SERVICE_NAME
from snaplearn_recommender.trainer import TrainerApp
from tests.helpers.recommender import in_process_settings
from tests.helpers.recommender import produce_classified as _produce

WAIT_S = 30.0


def _produce_malformed(bus: SqliteEventBus) -> None:
    headers = (
        (HEADER_EVENT_TYPE, IMAGE_CLASSIFIED_TYPE.encode()),
        (HEADER_SCHEMA_VERSION, SCHEMA_VERSION.encode()),
    )
    with bus.producer() as producer:
        producer.send(IMAGE_CLASSIFIED_TOPIC, b"\xff\xfe not a protobuf", key=b"mallory", headers=headers)
        producer.flush()


async def _recommend(
    stub: recommender_pb2_grpc.RecommenderServiceStub, user: str
) -> recommender_pb2.RecommendResponse:
    return await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=5)


async def _wait_until(
    stub: recommender_pb2_grpc.RecommenderServiceStub,
    done: Callable[[recommender_pb2.RecommendResponse], bool],
    user: str = "probe",
) -> recommender_pb2.RecommendResponse:
    """Poll Recommend until `done(response)` (the worker applies events on its own thread)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        response = await _recommend(stub, user)
        if done(response):
            return response
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not reached within {WAIT_S} s; last events_applied={response.events_applied}"
            )
        await asyncio.sleep(0.02)


def _count(response: recommender_pb2.RecommendResponse, concept: str) -> int:
    return sum(concept in item.concepts for item in response.items)


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


async def _start(tmp_path: Path, bus: SqliteEventBus) -> tuple[TrainerApp, grpc.aio.Channel]:
    app = await TrainerApp.start(in_process_settings(tmp_path / "checkpoints"), bus)
    return app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")


async def test_each_user_moves_toward_their_own_topic_and_health_is_serving(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    app, channel = await _start(tmp_path, bus)
    try:
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING

        before = await _recommend(stub, "fran")
        assert before.cold_start and before.events_applied == 0
        produced = await asyncio.to_thread(_produce, bus, [("fran", "fractions"), ("geo", "geometry")] * 10)
        await _wait_until(stub, lambda r: r.events_applied == produced)

        fractions = await _recommend(stub, "fran")
        geometry = await _recommend(stub, "geo")
        assert not fractions.cold_start and not geometry.cold_start
        assert _count(fractions, "fractions") >= 8 > _count(before, "fractions")
        assert _count(geometry, "geometry") >= 8
        assert fractions.items[0].reason == "practises fractions, which you photographed recently"
        assert fractions.model_version != before.model_version
    finally:
        await channel.close()
        await app.stop()


async def test_malformed_records_are_skipped_and_the_worker_keeps_going(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    app, channel = await _start(tmp_path, bus)
    try:
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
        await asyncio.to_thread(_produce, bus, [("fran", "fractions")])
        await asyncio.to_thread(_produce_malformed, bus)
        await asyncio.to_thread(_produce, bus, [("fran", "fractions"), ("geo", "geometry")], 1)
        await _wait_until(stub, lambda r: r.events_applied == 3)
        assert app.worker.stats.malformed == 1
        assert app.worker.stats.records_consumed == 4
        assert app.metrics.registry.get_sample_value("snaplearn_recommender_malformed_events_total") == 1.0
        assert not (await _recommend(stub, "geo")).cold_start
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Recommend(recommender_pb2.RecommendRequest(user_id="fran", k=101), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "k must be between 1 and 100" in (caught.value.details() or "")
    finally:
        await channel.close()
        await app.stop()


async def test_restart_from_checkpoint_does_not_reapply_events(tmp_path: Path, bus: SqliteEventBus) -> None:
    first, channel = await _start(tmp_path, bus)
    try:
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
        produced = await asyncio.to_thread(_produce, bus, [("fran", "fractions"), ("geo", "geometry")] * 5)
        await _wait_until(stub, lambda r: r.events_applied == produced)
        answer_before_restart = await _recommend(stub, "fran")
    finally:
        await channel.close()
        await first.stop()  # commits and writes the checkpoint

    later = await asyncio.to_thread(_produce, bus, [("geo", "geometry")] * 3, produced)
    second, channel = await _start(tmp_path, bus)
    try:
        # Restored, not replayed: proven below by records_consumed == later (reading
        # model.events_applied here raced with the worker thread applying `later`).
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
        response = await _wait_until(stub, lambda r: r.events_applied >= produced + later)
        assert response.events_applied == produced + later
        # Only the records after the checkpoint were read again; none was a duplicate.
        assert second.worker.stats.records_consumed == later
        assert second.worker.stats.duplicates == 0
        fractions = await _recommend(stub, "fran")
        assert not fractions.cold_start and _count(fractions, "fractions") >= 8
        assert _count(answer_before_restart, "fractions") >= 8
    finally:
        await channel.close()
        await second.stop()


async def test_similar_items_over_grpc_matches_the_serving_snapshot(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    app, channel = await _start(tmp_path, bus)
    try:
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
        produced = await asyncio.to_thread(_produce, bus, [("fran", "fractions"), ("geo", "geometry")] * 5)
        await _wait_until(stub, lambda r: r.events_applied == produced)
        snapshot = app.service.snapshot  # no more events arrive: this is the snapshot that answers
        source = snapshot.catalog[0]

        response = await stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(item_id=source.item_id, k=5), timeout=5
        )
        expected = snapshot.similar_items(source.item_id, 5)
        assert response.item_id == source.item_id and response.model_version == snapshot.version
        assert [item.item_id for item in response.items] == [item.item_id for item in expected.items]
        assert len(response.items) == 5 and source.item_id not in {item.item_id for item in response.items}
        assert all(-1.0001 <= item.score <= 1.0001 and item.title and item.reason for item in response.items)

        filtered = await stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(
                item_id=source.item_id, k=3, filters=recommender_pb2.RecommendFilters(formats=["video"])
            ),
            timeout=5,
        )
        assert filtered.items and all(item.format == "video" for item in filtered.items)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SimilarItems(recommender_pb2.SimilarItemsRequest(item_id="no-such-item"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown item_id 'no-such-item'" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SimilarItems(
                recommender_pb2.SimilarItemsRequest(item_id=source.item_id, k=101), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
        await app.stop()
