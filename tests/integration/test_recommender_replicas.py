"""Scale-out for real: one trainer and two query replicas (a real TrainerApp and QueryApps, gRPC on port 0)
over a real embedded bus and one snapshot directory, all in tmp_path.

The trainer consumes and publishes; the replicas only poll the directory. Every wait polls a
condition with a deadline (publish and poll intervals are 50 ms here); nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.launcher import ManagedProcess
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.model import ClassifiedEvent, RecommenderModel
from snaplearn_recommender.query import QueryApp
from snaplearn_recommender.servicer import SERVICE_NAME
from snaplearn_recommender.snapshot_store import LocalDirectoryStorage, SnapshotStore
from snaplearn_recommender.trainer import TrainerApp
from tests.helpers.recommender import in_process_settings, produce_classified

WAIT_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AppT = TypeVar("AppT", TrainerApp, QueryApp)


async def _eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.02)


class Node(Generic[AppT]):
    """A started app and stubs on one channel to it."""

    def __init__(self, app: AppT) -> None:
        self.app = app
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        self.stub = recommender_pb2_grpc.RecommenderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def recommend(self, user: str) -> recommender_pb2.RecommendResponse:
        return await self.stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=5)

    async def health_status(self) -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        return int(response.status)

    def metric(self, name: str) -> float | None:
        return self.app.metrics.registry.get_sample_value(f"snaplearn_recommender_{name}")

    async def close(self) -> None:
        await self.channel.close()
        await self.app.stop()


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node[Any]]]:
    started: list[Node[Any]] = []
    yield started
    for node in reversed(started):  # replicas first, the trainer last
        await node.close()


async def _start(
    tmp_path: Path, bus: SqliteEventBus, nodes: list[Node[Any]], app: type[AppT], name: str
) -> Node[AppT]:
    settings = in_process_settings(
        tmp_path / f"{name}-checkpoints",
        role="query" if app is QueryApp else "trainer",
        snapshot_dir=str(tmp_path / "snapshots"),
        publish_interval_s=0.05,
        poll_interval_s=0.05,
    )
    node = Node(await app.start(settings, bus))
    nodes.append(node)
    return node


async def _converged(trainer: Node[TrainerApp], replicas: Sequence[Node[QueryApp]], events: int) -> None:
    """Every replica serves the snapshot the trainer serves, once it has applied `events`."""

    async def done() -> bool:
        snapshot = trainer.app.service.snapshot
        if snapshot.events_applied != events:
            return False
        return all(
            r.app.follower.current is not None and r.app.follower.current.model_version == snapshot.version
            for r in replicas
        )

    await _eventually(done, f"replicas serving the trainer's snapshot after {events} events")


async def test_one_trainer_two_replicas_serve_the_same_personalised_answers(
    tmp_path: Path, bus: SqliteEventBus, nodes: list[Node[Any]]
) -> None:
    # A replica started before anything was published is alive but not ready, and says why.
    early = await _start(tmp_path, bus, nodes, QueryApp, "early")
    assert await early.health_status() == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await early.recommend("fran")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no model snapshot loaded yet" in (caught.value.details() or "")
    assert not hasattr(early.app, "worker") and not hasattr(early.app, "model")  # no consumer, no training

    trainer = await _start(tmp_path, bus, nodes, TrainerApp, "trainer")
    assert await trainer.health_status() == SERVING
    await _eventually(lambda: _is(early.health_status(), SERVING), "the early replica becomes SERVING")
    late = await _start(tmp_path, bus, nodes, QueryApp, "late")
    replicas = [early, late]

    produced = await asyncio.to_thread(
        produce_classified, bus, [("fran", "fractions"), ("geo", "geometry")] * 10
    )
    await _converged(trainer, replicas, produced)

    for user in ("fran", "geo", "stranger"):
        expected = await trainer.recommend(user)
        for replica in replicas:
            assert await replica.recommend(user) == expected, f"{user} differs on a replica"
    fran = await late.recommend("fran")
    assert not fran.cold_start and fran.events_applied == produced
    assert sum("fractions" in item.concepts for item in fran.items) >= 8
    assert fran.items[0].reason == "practises fractions, which you photographed recently"
    assert (await late.recommend("stranger")).cold_start

    # Both replicas hold the same store version, which the trainer published; they report it.
    versions = {r.app.follower.current.version for r in replicas if r.app.follower.current}
    assert trainer.app.publisher is not None and trainer.app.publisher.last_manifest is not None
    assert versions == {trainer.app.publisher.last_manifest.version}
    for replica in replicas:
        assert replica.metric("snapshot_store_version") == trainer.app.publisher.last_manifest.version
        assert replica.metric("known_users") == 2
        assert replica.metric("snapshot_load_failures_total") == 0
        assert not (tmp_path / f"{'early' if replica is early else 'late'}-checkpoints").exists()
    assert trainer.metric("snapshot_store_version") == trainer.app.publisher.last_manifest.version

    # More events: the replicas follow.
    more = await asyncio.to_thread(produce_classified, bus, [("geo", "geometry")] * 4, produced)
    await _converged(trainer, replicas, produced + more)
    assert (await early.recommend("geo")) == (await trainer.recommend("geo"))


async def test_a_corrupt_newest_snapshot_is_skipped_and_the_previous_keeps_serving(
    tmp_path: Path, bus: SqliteEventBus, nodes: list[Node[Any]]
) -> None:
    trainer = await _start(tmp_path, bus, nodes, TrainerApp, "trainer")
    replica = await _start(tmp_path, bus, nodes, QueryApp, "replica")
    produced = await asyncio.to_thread(produce_classified, bus, [("fran", "fractions")] * 6)
    await _converged(trainer, [replica], produced)
    assert replica.app.follower.current is not None
    serving = replica.app.follower.current
    before = await replica.recommend("fran")

    # A broken writer: a newest version whose file is torn, with LATEST pointing at it.
    store = SnapshotStore(LocalDirectoryStorage(tmp_path / "snapshots"))
    torn = store.publish(trainer.app.service.snapshot)
    path = tmp_path / "snapshots" / torn.file
    path.write_bytes(path.read_bytes()[: torn.size // 2])

    async def skipped() -> bool:
        return replica.metric("snapshot_load_failures_total") == 1

    await _eventually(skipped, "the replica notices the torn version")
    assert replica.app.follower.current == serving
    assert await replica.recommend("fran") == before
    assert await replica.health_status() == SERVING

    # The trainer's next publish gets past it.
    more = await asyncio.to_thread(produce_classified, bus, [("fran", "fractions")] * 2, produced)
    await _converged(trainer, [replica], produced + more)
    assert replica.app.follower.current.version > torn.version
    assert await replica.recommend("fran") == await trainer.recommend("fran")
    assert replica.metric("snapshot_load_failures_total") == 1


async def test_a_replica_process_configured_by_environment_serves_what_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command (`python -m snaplearn_recommender.main`), configured like the Deployment."""
    snapshots = tmp_path / "snapshots"
    # The child inherits this environment (the Deployment sets these variables).
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_ROLE", "query")
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_SNAPSHOT_DIR", str(snapshots))
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_POLL_INTERVAL", "0.05")
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("SNAPLEARN_BUS_PATH", str(tmp_path / "bus.db"))
    replica = ManagedProcess(
        "query replica",
        [sys.executable, "-m", "snaplearn_recommender.main", "--port", "0", "--metrics-port", "0",
         "--ready-file", str(tmp_path / "replica.json")],
        tmp_path / "replica.log",
        tmp_path / "replica.json",
    )  # fmt: skip
    replica.start()
    try:
        ports = await asyncio.to_thread(replica.wait_ready, WAIT_S)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['port']}")
        health = health_pb2_grpc.HealthStub(channel)
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)

        async def status() -> int:
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            return int((await health.Check(request, timeout=5)).status)

        assert await status() == NOT_SERVING
        model = RecommenderModel(generate_sample_catalog())
        model.apply([ClassifiedEvent(f"e{i}", "fran", (("fractions", 0.9),), 1_000.0 + i) for i in range(8)])
        snapshot = model.snapshot()
        await asyncio.to_thread(SnapshotStore(LocalDirectoryStorage(snapshots)).publish, snapshot)
        await _eventually(lambda: _is(status(), SERVING), "the replica process loads the snapshot")

        response = await stub.Recommend(recommender_pb2.RecommendRequest(user_id="fran", k=10), timeout=5)
        expected = snapshot.recommend("fran", k=10)
        assert response.model_version == snapshot.version and response.events_applied == 8
        assert [item.item_id for item in response.items] == [item.item_id for item in expected.items]
        await channel.close()
    finally:
        await asyncio.to_thread(replica.stop)
    assert replica.process is not None and replica.process.returncode == 0, replica.log_tail()
    assert "recommender (query) listening" in replica.log_tail(200)
    assert not (tmp_path / "checkpoints").exists()  # a replica writes no checkpoints


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected
