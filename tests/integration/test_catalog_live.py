"""A school's own catalog through the real recommender: declared features filter Recommend and
SimilarItems over gRPC, and catalog changes (added / changed / retired) published by the sync
command reach a running worker without a restart, and stay applied across restarts from a
checkpoint. Real grpc.aio server on port 0, real SqliteEventBus, real LightFM model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from snaplearn.events.v1 import events_pb2
from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import encode_catalog_change
from snaplearn_recommender import catalog_sync
from snaplearn_recommender.catalog import Catalog, LearningItem, diff_catalogs, item_to_proto, load_catalog
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.trainer import TrainerApp
from tests.contract.eventbus_contract import poll_until
from tests.helpers.catalogs import SCHOOL_DECLARATION as DECLARATION

WAIT_S = 30.0
HEADER = "\ufeffExercise ID,Title,Concepts,Topic,Areas,Minutes,Needs\r\n"
ROWS = {
    "frac-1": "frac-1,Comparing fractions,fractions,Fractions,number|visual,5,",
    "frac-2": "frac-2,Fractions on a number line,fractions,Fractions,number,15,frac-1",
    "frac-3": "frac-3,Adding fractions,fractions,Fractions,number,25,frac-2",
    "geo-1": "geo-1,Angles in a triangle,geometry,Geometry,shape|visual,12,",
    "geo-2": "geo-2,Area of rectangles,geometry,Geometry,shape|number,18,geo-1",
    "geo-3": "geo-3,Volume of prisms,geometry;multiplication,Geometry,shape,30,geo-2",
    "mul-1": "mul-1,Times tables,multiplication,Arithmetic,number,8,",
    "mul-2": "mul-2,Long multiplication,multiplication,Arithmetic,number,22,mul-1",
}
NEW_ITEM = "alg-1,Balancing equations,equations,Algebra,symbols,14,mul-1"
CHANGED_GEO_2 = "geo-2,Area and perimeter of rectangles,geometry,Measurement,shape|number,9,geo-1"
COMPLETED = recommender_pb2.FEEDBACK_KIND_COMPLETED


def _write_catalog(path: Path, rows: list[str]) -> Path:
    path.write_bytes((HEADER + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    path.with_name(path.stem + ".features.toml").write_text(DECLARATION, encoding="utf-8")
    return path


def _settings(tmp_path: Path, catalog: Path) -> RecommenderSettings:
    return RecommenderSettings(
        port=0,
        metrics_port=0,
        catalog_path=catalog,
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_interval_s=0.1,
        batch_max_wait_ms=10,
    )


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


class Recommender:
    """A started TrainerApp and a stub on its port."""

    def __init__(self, app: TrainerApp, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.channel = channel
        self.stub = recommender_pb2_grpc.RecommenderServiceStub(channel)

    @classmethod
    async def start(cls, settings: RecommenderSettings, bus: SqliteEventBus) -> Recommender:
        app = await TrainerApp.start(settings, bus)
        return cls(app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}"))

    async def stop(self) -> None:
        await self.channel.close()
        await self.app.stop()

    async def recommend(
        self, user: str, k: int = 100, **filters: object
    ) -> recommender_pb2.RecommendResponse:
        request = recommender_pb2.RecommendRequest(
            user_id=user,
            k=k,
            filters=recommender_pb2.RecommendFilters(**filters),  # type: ignore[arg-type]
        )
        return await self.stub.Recommend(request, timeout=5)

    async def ids(self, user: str, **filters: Any) -> list[str]:
        return [item.item_id for item in (await self.recommend(user, **filters)).items]

    async def wait_applied(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while (applied := (await self.recommend("probe", 1)).events_applied) < count:
            assert time.monotonic() < deadline, f"{applied} of {count} events applied within {WAIT_S} s"
            await asyncio.sleep(0.02)


def _feature(
    name: str, *values: str, minimum: float | None = None, maximum: float | None = None
) -> recommender_pb2.FeatureFilter:
    spec = recommender_pb2.FeatureFilter(name=name, values=values)
    if minimum is not None:
        spec.min = minimum
    if maximum is not None:
        spec.max = maximum
    return spec


async def _checkpointed(checkpoints: Path, done: object) -> Catalog:
    """The checkpoint's catalog once `done(catalog)` holds (the worker checkpoints every 0.1 s)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        checkpoint = await asyncio.to_thread(Checkpointer(checkpoints).load)
        if checkpoint is not None and done(checkpoint.model.catalog):  # type: ignore[operator]
            return checkpoint.model.catalog
        assert time.monotonic() < deadline, "the checkpoint did not catch up"
        await asyncio.sleep(0.05)


async def test_declared_features_filter_recommend_and_similar_items_over_grpc(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    catalog = _write_catalog(tmp_path / "school.csv", list(ROWS.values()))
    server = await Recommender.start(_settings(tmp_path, catalog), bus)
    try:
        assert sorted(await server.ids("new", features=[_feature("topic", "Geometry")])) == [
            "geo-1",
            "geo-2",
            "geo-3",
        ]
        visual = await server.ids("new", features=[_feature("area", "visual")])
        assert sorted(visual) == ["frac-1", "geo-1"]
        ranged = await server.ids("new", features=[_feature("minutes", minimum=10, maximum=20)])
        assert sorted(ranged) == ["frac-2", "geo-1", "geo-2"]
        both = await server.ids(
            "new",
            features=[_feature("area", "number"), _feature("minutes", minimum=20)],
            concepts=["fractions"],
        )
        assert both == ["frac-3"]

        item = (await server.recommend("new", features=[_feature("topic", "Arithmetic")], k=1)).items[0]
        features = {
            f.name: (tuple(f.values), f.number if f.HasField("number") else None) for f in item.features
        }
        assert item.item_id in ("mul-1", "mul-2")
        if item.item_id == "mul-2":
            assert features == {
                "area": (("number",), None),
                "minutes": (("22",), 22.0),
                "topic": (("Arithmetic",), None),
            }
            assert list(item.prerequisites) == ["mul-1"]
        assert (item.grade, item.format) == (0, "")  # this catalog declares neither

        similar = await server.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(
                item_id="geo-1",
                k=10,
                filters=recommender_pb2.RecommendFilters(features=[_feature("topic", "Fractions")]),
            ),
            timeout=5,
        )
        assert sorted(i.item_id for i in similar.items) == ["frac-1", "frac-2", "frac-3"]

        for features_, expected in (
            ([_feature("colour", "red")], "unknown feature 'colour'; this catalog's features are "),
            (
                [_feature("topic", "Chemistry")],
                "unknown topic value(s) ['Chemistry']; this catalog has Fractions",
            ),
            ([_feature("topic", minimum=1)], "feature 'topic' is not numeric"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.recommend("new", features=features_)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.recommend("new", grades=[4])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown feature 'grade'" in (caught.value.details() or "")
    finally:
        await server.stop()


async def test_live_add_change_and_retire_reach_a_running_worker_and_survive_restarts(
    tmp_path: Path, bus: SqliteEventBus, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = tmp_path / "checkpoints"
    first = _write_catalog(tmp_path / "school.csv", list(ROWS.values()))
    server = await Recommender.start(_settings(tmp_path, first), bus)
    try:
        for item in ("geo-1", "geo-3", "frac-1"):
            await server.stub.RecordFeedback(
                recommender_pb2.RecordFeedbackRequest(user_id="ada", item_id=item, kind=COMPLETED), timeout=5
            )
        await server.wait_applied(3)
        assert "frac-3" in await server.ids("ada")
        await _checkpointed(checkpoints, lambda catalog: catalog.get("frac-3") is not None)

        # The school's new file: one item added, one changed, one retired.
        rows = [row for item_id, row in ROWS.items() if item_id not in ("frac-3", "geo-2")]
        second = _write_catalog(tmp_path / "school-v2.csv", [*rows, CHANGED_GEO_2, NEW_ITEM])
        sync_args = [
            "--catalog",
            str(second),
            "--checkpoint-dir",
            str(checkpoints),
            "--bus-path",
            str(tmp_path / "bus.db"),
        ]
        assert await asyncio.to_thread(catalog_sync.main, sync_args) == 0
        assert "1 added, 1 changed, 1 retired; published 3 event(s)" in capsys.readouterr().out
        await server.wait_applied(6)  # 3 feedback + 3 catalog events, applied without a restart

        for user in ("ada", "someone-new"):
            ids = await server.ids(user)
            assert "frac-3" not in ids and "alg-1" in ids and len(ids) == len(ROWS)
        assert await server.ids("ada", features=[_feature("topic", "Algebra")]) == ["alg-1"]  # cold start
        changed = (await server.recommend("ada", features=[_feature("topic", "Measurement")])).items
        assert [(i.item_id, i.title) for i in changed] == [("geo-2", "Area and perimeter of rectangles")]
        long_ones = await server.ids("ada", features=[_feature("minutes", minimum=20)])
        assert sorted(long_ones) == ["geo-3", "mul-2"]  # frac-3 (25 minutes) is retired
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.SimilarItems(recommender_pb2.SimilarItemsRequest(item_id="frac-3"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.RecordFeedback(
                recommender_pb2.RecordFeedbackRequest(user_id="ada", item_id="frac-3", kind=COMPLETED),
                timeout=5,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        similar = await server.stub.SimilarItems(
            recommender_pb2.SimilarItemsRequest(item_id="frac-2", k=100), timeout=5
        )
        assert "frac-3" not in [i.item_id for i in similar.items]

        # Once checkpointed, syncing the same file again publishes nothing.
        await _checkpointed(
            checkpoints, lambda catalog: catalog.get("alg-1") is not None and catalog.is_retired("frac-3")
        )
        assert await asyncio.to_thread(catalog_sync.main, sync_args) == 0
        assert "0 added, 0 changed, 0 retired; published 0 event(s)" in capsys.readouterr().out
    finally:
        await server.stop()

    # While the recommender is down, another retirement is published; a restart from the
    # checkpoint (with the file the school still has) applies it from the bus, exactly once.
    without_geo_3 = [row for row in rows if not row.startswith("geo-3,")]
    third = _write_catalog(tmp_path / "school-v3.csv", [*without_geo_3, CHANGED_GEO_2, NEW_ITEM])
    assert await asyncio.to_thread(catalog_sync.main, ["--catalog", str(third), *sync_args[2:]]) == 0
    assert "0 added, 0 changed, 1 retired; published 1 event(s)" in capsys.readouterr().out
    server = await Recommender.start(_settings(tmp_path, second), bus)
    try:
        await server.wait_applied(7)
        ids = await server.ids("ada")
        assert "geo-3" not in ids and "frac-3" not in ids and "alg-1" in ids and len(ids) == len(ROWS) - 1
        assert (await server.recommend("probe", 1)).events_applied == 7
        assert server.app.model.catalog.is_retired("frac-3")
    finally:
        await server.stop()

    # Switching to another catalog: items only the checkpoint still knows are never recommended.
    other = _write_catalog(tmp_path / "other.csv", [ROWS["mul-1"], ROWS["mul-2"], NEW_ITEM])
    server = await Recommender.start(_settings(tmp_path, other), bus)
    try:
        for user in ("ada", "someone-new"):
            assert sorted(await server.ids(user)) == ["alg-1", "mul-1", "mul-2"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.SimilarItems(recommender_pb2.SimilarItemsRequest(item_id="geo-1"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "retired from this model's catalog" in (caught.value.details() or "")
    finally:
        await server.stop()


async def test_a_catalog_event_the_model_cannot_take_is_dead_lettered_and_the_partition_flows(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    catalog = _write_catalog(tmp_path / "school.csv", list(ROWS.values()))
    settings = _settings(tmp_path, catalog)
    server = await Recommender.start(settings, bus)
    try:
        bad = events_pb2.CatalogItemAdded(
            event_id="bad-1",
            item=events_pb2.CatalogItem(item_id="loop-1", title="Loop", prerequisites=["loop-1"]),
        )
        good = events_pb2.CatalogItemAdded(
            event_id="good-1", item=item_to_proto(LearningItem("ok-1", "Fine", features={"topic": ("New",)}))
        )
        producer = bus.producer()
        for message in (bad, good):
            event = encode_catalog_change(message)
            producer.send(settings.bus.topic, event.value, key=event.key, headers=event.headers)
        producer.flush()
        producer.close()
        await server.wait_applied(1)
        assert await server.ids("new", features=[_feature("topic", "New")]) == ["ok-1"]
        assert server.app.worker.stats.dead_lettered == 1
        consumer = bus.consumer("dlq-reader", [settings.bus.topic + ".dlq"])
        records = poll_until(consumer, 1)
        consumer.close()
        assert b"cannot be its own prerequisite" in (records[0].header("dlq-error") or b"")
    finally:
        await server.stop()


async def test_a_replay_meets_a_new_item_before_the_feedback_on_it_in_every_partition(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    # No checkpoints: every start replays the whole log into a fresh model, partitions in any order.
    first = _write_catalog(tmp_path / "school.csv", list(ROWS.values()))
    settings = _settings(tmp_path, first).model_copy(update={"checkpoint_dir": None})
    assert settings.bus.partitions > 1
    second = _write_catalog(tmp_path / "school-v2.csv", [*ROWS.values(), NEW_ITEM])
    changes = diff_catalogs(load_catalog(first), load_catalog(second))
    server = await Recommender.start(settings, bus)
    try:
        published = await asyncio.to_thread(
            catalog_sync.publish_changes, bus, settings.bus.topic, settings.bus.partitions, changes
        )
        assert published == 1
        await server.wait_applied(1)
        assert server.app.worker.stats.duplicates == settings.bus.partitions - 1  # the other copies
        students = [f"student-{i}" for i in range(12)]  # keyed by user: spread over the partitions
        for user in students:
            await server.stub.RecordFeedback(
                recommender_pb2.RecordFeedbackRequest(user_id=user, item_id="alg-1", kind=COMPLETED),
                timeout=5,
            )
        await server.wait_applied(1 + len(students))
    finally:
        await server.stop()
    server = await Recommender.start(settings, bus)
    try:
        await server.wait_applied(1 + len(students))
        assert server.app.worker.stats.dead_lettered == 0
        for user in students:
            assert "alg-1" in [i.item_id for i in server.app.model.snapshot().recommend(user, k=100).items]
            assert (
                server.app.model.snapshot().seen_items[server.app.model.snapshot().user_index[user]].size == 1
            )
    finally:
        await server.stop()
