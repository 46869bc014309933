"""Forget a student end to end: ForgetStudent over a real grpc.aio recommender (port 0, role trainer,
so it also writes snapshot files) on a real SqliteEventBus. The tombstone travels on the bus and
the worker applies it in order; afterwards Recommend treats the id as new, and no checkpoint or
snapshot file holds the id's bytes (older snapshot versions are pruned), including after a
replay from a checkpoint taken before the forget."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.snapshot_store import SnapshotStore, open_storage
from snaplearn_recommender.trainer import TrainerApp
from tests.helpers.recommender import in_process_settings, produce_classified

WAIT_S = 30.0
# Distinctive bytes, so that a grep over the files cannot match anything else.
FORGOTTEN = "zed-forget-7Q3vX"
KEPT = "amy-kept-9Lw2"
Stub = recommender_pb2_grpc.RecommenderServiceStub


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


def _settings(tmp_path: Path) -> RecommenderSettings:
    return in_process_settings(
        tmp_path / "checkpoints",
        role="trainer",
        snapshot_dir=str(tmp_path / "snapshots"),
        publish_interval_s=0.05,
    )


async def _recommend(stub: Stub, user: str) -> recommender_pb2.RecommendResponse:
    return await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=5)


async def _wait_applied(stub: Stub, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while (applied := (await _recommend(stub, "probe")).events_applied) < count:
        assert time.monotonic() < deadline, f"{applied} of {count} events applied within {WAIT_S} s"
        await asyncio.sleep(0.02)


def _files(tmp_path: Path) -> dict[Path, int]:
    """Every checkpoint and snapshot-store file with its mtime (ns)."""
    roots = [tmp_path / "checkpoints", tmp_path / "snapshots"]
    return {
        p: p.stat().st_mtime_ns for root in roots if root.exists() for p in root.rglob("*") if p.is_file()
    }


def _snapshots_after(tmp_path: Path, events_applied: int) -> list[Path]:
    """The snapshot files of the store built once the model had applied `events_applied` events
    (a publish racing the forget may still write an older snapshot; the store prunes it later)."""
    store = SnapshotStore(open_storage(str(tmp_path / "snapshots")))
    return [
        tmp_path / "snapshots" / manifest.file
        for manifest, _ in map(store.load, store.versions())
        if manifest.events_applied >= events_applied
    ]


def _holding(paths: list[Path], user: str) -> list[str]:
    return [p.name for p in paths if user.encode() in p.read_bytes()]


def _items(response: recommender_pb2.RecommendResponse) -> list[tuple[str, str]]:
    return [(item.item_id, item.reason) for item in response.items]


async def test_forget_erases_the_student_from_model_snapshots_and_checkpoints_even_after_a_replay(
    bus: SqliteEventBus, tmp_path: Path
) -> None:
    # 1. The student has photos, an attempt and a skip; a checkpoint holds them.
    app = await TrainerApp.start(_settings(tmp_path), bus)
    try:
        sent = await asyncio.to_thread(
            produce_classified, bus, [(FORGOTTEN, "fractions"), (KEPT, "geometry"), (FORGOTTEN, "fractions")]
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            for kind, outcome in (
                (recommender_pb2.FEEDBACK_KIND_COMPLETED, recommender_pb2.ATTEMPT_OUTCOME_CORRECT),
                (recommender_pb2.FEEDBACK_KIND_SKIPPED, recommender_pb2.ATTEMPT_OUTCOME_UNSPECIFIED),
            ):
                request = recommender_pb2.RecordFeedbackRequest(
                    user_id=FORGOTTEN,
                    item_id="fractions-002" if outcome else "fractions-003",
                    kind=kind,
                    outcome=outcome,
                )
                assert (await stub.RecordFeedback(request, timeout=5)).accepted
            await _wait_applied(stub, sent + 2)
            known = await _recommend(stub, FORGOTTEN)
            assert not known.cold_start
            assert "fractions-003" not in [item for item, _ in _items(known)]  # the skip hides it
            state = await stub.GetStudentState(
                recommender_pb2.GetStudentStateRequest(user_id=FORGOTTEN), timeout=5
            )
            assert [a.item_id for a in state.recent_attempts] == ["fractions-002"]
    finally:
        await app.stop()
    checkpoint = tmp_path / "checkpoints" / "recommender.ckpt"
    before_forget = tmp_path / "before-forget"
    before_forget.mkdir()
    shutil.copy2(_checkpoint_file(tmp_path), before_forget)
    assert _holding([_checkpoint_file(tmp_path)], FORGOTTEN), "the grep below would prove nothing"

    # 2. Forget it, through the RPC: the tombstone is applied once, in order.
    written_before = _files(tmp_path)
    app = await TrainerApp.start(_settings(tmp_path), bus)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            forget = recommender_pb2.ForgetStudentRequest(user_id=FORGOTTEN, request_id="forget-1")
            response = await stub.ForgetStudent(forget, timeout=5)
            assert (response.event_id, response.accepted) == ("forget-1", True)
            assert not (await stub.ForgetStudent(forget, timeout=5)).accepted  # a retry publishes nothing
            await _wait_applied(stub, sent + 3)
            after = await _recommend(stub, FORGOTTEN)
            assert after.cold_start
            assert _items(after) == _items(await _recommend(stub, "someone-never-seen"))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetStudentState(
                    recommender_pb2.GetStudentStateRequest(user_id=FORGOTTEN), timeout=5
                )
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
            assert not (await _recommend(stub, KEPT)).cold_start  # the other student stays
            snapshot = app.service.snapshot
            assert FORGOTTEN not in snapshot.user_index and KEPT in snapshot.user_index
            assert snapshot.mastery is not None and FORGOTTEN not in snapshot.mastery.students
            assert FORGOTTEN not in snapshot.recent_attempts
            assert not app.model.skipped(FORGOTTEN) and not app.model.profile(FORGOTTEN)
    finally:
        await app.stop()  # writes the checkpoint and publishes the last snapshot
    written_after = [p for p, mtime in _files(tmp_path).items() if written_before.get(p) != mtime]
    assert checkpoint in written_after
    snapshots = _snapshots_after(tmp_path, sent + 3)
    assert snapshots and all(p in written_after for p in snapshots)
    assert _holding([checkpoint, *snapshots], FORGOTTEN) == []
    assert _holding([checkpoint], KEPT)  # the same grep finds a student who was not forgotten
    # No version published before the forget is left either: the first publish without the
    # student deleted them (D48), so every file in the store is one of those above.
    assert sorted(_every_snapshot(tmp_path)) == sorted(snapshots)

    # 3. Replay from the checkpoint taken before the forget: the tombstone is applied again.
    shutil.copy2(before_forget / checkpoint.name, checkpoint)
    written_before = _files(tmp_path)
    app = await TrainerApp.start(_settings(tmp_path), bus)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            await _wait_applied(stub, sent + 3)
            assert (await _recommend(stub, FORGOTTEN)).cold_start
    finally:
        await app.stop()
    written_after = [p for p, mtime in _files(tmp_path).items() if written_before.get(p) != mtime]
    assert checkpoint in written_after
    replayed = [p for p in _snapshots_after(tmp_path, sent + 3) if p in written_after]
    assert replayed, "the replayed model published no snapshot"
    assert _holding([checkpoint, *replayed], FORGOTTEN) == []
    # The restored pre-forget model was published at start; the replayed tombstone pruned it.
    assert _holding(_every_snapshot(tmp_path), FORGOTTEN) == []


def _every_snapshot(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "snapshots").glob("snapshot-*.snap"))


def _checkpoint_file(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints" / "recommender.ckpt"
