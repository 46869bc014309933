"""A school's catalog declared by flags alone, through a real recommender (gRPC on port 0, the
embedded bus): `--catalog school.csv --catalog-feature topic@Topic --catalog-feature
minutes=numeric:10,20` makes both features filters of Recommend, with their values in the answer."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.trainer import TrainerApp
from tests.helpers.recommender import in_process_settings

CSV = (
    "item_id,title,concepts,Topic,minutes\n"
    "a-1,Fractions one,fractions,Number,5\n"
    "a-2,Fractions two,fractions,Number,12\n"
    "g-1,Angles,geometry,Shape,30\n"
    "g-2,Triangles,geometry,Shape,8\n"
)


async def test_features_declared_by_flags_filter_recommend(tmp_path: Path) -> None:
    catalog = tmp_path / "school.csv"
    catalog.write_text(CSV, encoding="utf-8")
    argv = ["--catalog", str(catalog), "--catalog-feature", "topic@Topic"]
    argv += ["--catalog-feature", "minutes=numeric:10,20"]
    flags = RecommenderSettings.from_argv(argv, environ={})
    settings = in_process_settings(
        tmp_path / "checkpoints", catalog_path=flags.catalog_path, catalog_feature=flags.catalog_feature
    )
    bus = SqliteEventBus(tmp_path / "bus.db")
    app = await TrainerApp.start(settings, bus)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)

            async def ids(*filters: recommender_pb2.FeatureFilter) -> list[str]:
                request = recommender_pb2.RecommendRequest(
                    user_id="new", k=10, filters=recommender_pb2.RecommendFilters(features=filters)
                )
                response = await stub.Recommend(request, timeout=5)
                return sorted(item.item_id for item in response.items)

            assert await ids() == ["a-1", "a-2", "g-1", "g-2"]
            assert await ids(recommender_pb2.FeatureFilter(name="topic", values=["Shape"])) == ["g-1", "g-2"]
            assert await ids(recommender_pb2.FeatureFilter(name="minutes", max=10)) == ["a-1", "g-2"]
            short_shapes = await ids(
                recommender_pb2.FeatureFilter(name="topic", values=["Shape"]),
                recommender_pb2.FeatureFilter(name="minutes", max=10),
            )
            assert short_shapes == ["g-2"]
            response = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="new", k=10), timeout=5)
            features = {
                item.item_id: {f.name: (list(f.values), f.number) for f in item.features}
                for item in response.items
            }
            assert features["g-1"] == {"minutes": (["30"], 30.0), "topic": (["Shape"], 0.0)}
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await ids(
                    recommender_pb2.FeatureFilter(name="Topic", values=["Shape"])
                )  # the column, not the name
            assert unknown.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await app.stop()
        bus.close()
