"""RecordFeedback end to end in one process: a real grpc.aio recommender on port 0 over a real
SqliteEventBus; the call publishes a FeedbackRecorded event, the worker thread consumes it
with the photos and trains the model, and Recommend reflects it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_client import cli
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import (
    FeedbackKind,
    encode_feedback_recorded,
    encode_image_classified,
)
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.model import RecommenderModel
from snaplearn_recommender.query import QueryApp
from snaplearn_recommender.trainer import TrainerApp
from snaplearn_recommender.worker import RecommenderWorker, WorkerSettings
from tests.contract.eventbus_contract import poll_until, unique

WAIT_S = 30.0
CATALOG = generate_sample_catalog()
GEOMETRY = [CATALOG[int(p)] for p in CATALOG.positions_for_concept("geometry")]
COMPLETED = recommender_pb2.FEEDBACK_KIND_COMPLETED
SKIPPED = recommender_pb2.FEEDBACK_KIND_SKIPPED


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


@pytest.fixture
async def app(tmp_path: Path, bus: SqliteEventBus) -> AsyncIterator[TrainerApp]:
    settings = RecommenderSettings(
        port=0, metrics_port=0, checkpoint_dir=tmp_path / "checkpoints", batch_max_wait_ms=10
    )
    started = await TrainerApp.start(settings, bus)
    yield started
    await started.stop()


@pytest.fixture
async def stub(app: TrainerApp) -> AsyncIterator[recommender_pb2_grpc.RecommenderServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield recommender_pb2_grpc.RecommenderServiceStub(channel)


async def _recommend(
    stub: recommender_pb2_grpc.RecommenderServiceStub, user: str, **kwargs: object
) -> recommender_pb2.RecommendResponse:
    return await stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10, **kwargs), timeout=5)  # type: ignore[arg-type]


async def _wait_applied(stub: recommender_pb2_grpc.RecommenderServiceStub, count: int) -> None:
    """Until the serving snapshot has applied `count` events (the worker runs on its own thread)."""
    deadline = time.monotonic() + WAIT_S
    while (applied := (await _recommend(stub, "probe")).events_applied) < count:
        assert time.monotonic() < deadline, f"{applied} of {count} events applied within {WAIT_S} s"
        await asyncio.sleep(0.02)


async def _feedback(
    stub: recommender_pb2_grpc.RecommenderServiceStub, user: str, item: str, kind: int, request_id: str = ""
) -> recommender_pb2.RecordFeedbackResponse:
    request = recommender_pb2.RecordFeedbackRequest(
        user_id=user, item_id=item, kind=kind, request_id=request_id
    )  # type: ignore[arg-type]
    return await stub.RecordFeedback(request, timeout=5)


def _ids(response: recommender_pb2.RecommendResponse) -> list[str]:
    return [item.item_id for item in response.items]


async def test_completed_feedback_trains_the_model_and_a_skip_hides_the_item_for_that_student(
    app: TrainerApp, stub: recommender_pb2_grpc.RecommenderServiceStub
) -> None:
    item = GEOMETRY[0]
    assert (await _recommend(stub, "ada")).cold_start
    reply = await _feedback(stub, "ada", item.item_id, COMPLETED, request_id="fb-1")
    assert (reply.event_id, reply.accepted) == ("fb-1", True)
    await _wait_applied(stub, 1)
    after = await _recommend(stub, "ada")
    assert not after.cold_start
    assert sum(bool(set(i.concepts) & set(item.concepts)) for i in after.items) >= 8
    assert item.item_id not in _ids(await _recommend(stub, "ada", exclude_seen=True))

    # bob completes the same item: his list starts like ada's; then ada skips her top item.
    await _feedback(stub, "bob", item.item_id, COMPLETED)
    await _wait_applied(stub, 2)
    top = _ids(await _recommend(stub, "ada"))[0]
    assert (await _feedback(stub, "ada", top, SKIPPED)).accepted
    await _wait_applied(stub, 3)
    assert top not in _ids(await _recommend(stub, "ada"))
    assert top in _ids(await _recommend(stub, "bob"))
    assert app.model.skipped("ada") == (top,)

    retry = await _feedback(stub, "ada", item.item_id, COMPLETED, request_id="fb-1")
    assert (retry.event_id, retry.accepted) == ("fb-1", False)
    # A sentinel from the same student (same partition, published after the retry): once it is
    # applied, a record the retry had published would have been consumed too.
    await _feedback(stub, "ada", GEOMETRY[2].item_id, COMPLETED)
    await _wait_applied(stub, 4)
    assert (app.worker.stats.records_consumed, app.worker.stats.feedback_applied) == (4, 4)


@pytest.mark.parametrize(
    ("user", "item", "kind", "code", "message"),
    [
        ("", GEOMETRY[0].item_id, COMPLETED, grpc.StatusCode.INVALID_ARGUMENT, "user_id is required"),
        ("ada", "", COMPLETED, grpc.StatusCode.INVALID_ARGUMENT, "item_id is required"),
        ("ada", GEOMETRY[0].item_id, 0, grpc.StatusCode.INVALID_ARGUMENT, "kind must be one of"),
        ("ada", GEOMETRY[0].item_id, 7, grpc.StatusCode.INVALID_ARGUMENT, "kind must be one of"),
        ("ada", "no-such-item", SKIPPED, grpc.StatusCode.NOT_FOUND, "unknown item_id 'no-such-item'"),
    ],
    ids=["empty-user", "empty-item", "unspecified-kind", "unknown-kind", "unknown-item"],
)
async def test_bad_feedback_is_refused_before_anything_is_published(
    app: TrainerApp, stub: recommender_pb2_grpc.RecommenderServiceStub, user, item, kind, code, message
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _feedback(stub, user, item, kind)
    assert caught.value.code() == code
    assert message in (caught.value.details() or "")
    assert app.frontend.feedback.publisher.published == app.frontend.feedback.publisher.buffered == 0


async def test_a_time_in_the_future_is_invalid(stub: recommender_pb2_grpc.RecommenderServiceStub) -> None:
    request = recommender_pb2.RecordFeedbackRequest(
        user_id="ada", item_id=GEOMETRY[0].item_id, kind=COMPLETED
    )
    request.time.FromSeconds(int(time.time()) + 3600)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordFeedback(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_cli_records_feedback(
    app: TrainerApp, stub: recommender_pb2_grpc.RecommenderServiceStub, capsys: pytest.CaptureFixture[str]
) -> None:
    item = GEOMETRY[1].item_id
    argv = ["--recommender", f"127.0.0.1:{app.port}", "feedback", "--user", "cy", "--item", item]
    assert await asyncio.to_thread(cli.main, [*argv, "--kind", "viewed", "--request-id", "cli-1"]) == 0
    assert capsys.readouterr().out.strip() == f"viewed {item} for cy: recorded (event cli-1)"
    assert await asyncio.to_thread(cli.main, [*argv, "--kind", "viewed", "--request-id", "cli-1"]) == 0
    assert "already recorded" in capsys.readouterr().out
    await _wait_applied(stub, 1)
    assert item not in _ids(await _recommend(stub, "cy", exclude_seen=True))
    bad = [
        "--recommender",
        f"127.0.0.1:{app.port}",
        "feedback",
        "--user",
        "cy",
        "--item",
        "nope",
        "--kind",
        "skipped",
    ]
    assert await asyncio.to_thread(cli.main, bad) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


# --- the worker on the shared topic -----------------------------------------------------------------


@pytest.fixture
def sync_bus(tmp_path: Path) -> Iterator[SqliteEventBus]:
    with SqliteEventBus(tmp_path / "worker-bus.db", auto_create_partitions=2) as event_bus:
        yield event_bus


def _run_until(worker: RecommenderWorker, done: Callable[[], bool]) -> None:
    worker.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, f"not done within {WAIT_S} s: {worker.stats}"
            time.sleep(0.01)
    finally:
        worker.stop()


def test_the_worker_applies_photos_and_feedback_in_order_dedupes_and_dead_letters_unknown_items(
    sync_bus: SqliteEventBus,
) -> None:
    settings = WorkerSettings(topic=unique("events"), group_id=unique("recommender"), topic_partitions=2)
    t0 = 1_700_000_000.0
    skipped = encode_feedback_recorded("fb-2", "ada", GEOMETRY[1].item_id, FeedbackKind.SKIPPED, t0 + 2)
    events = [
        encode_image_classified("photo-1", "ada", t0, "m", "1", [("geometry", 0.9)]),
        encode_feedback_recorded("fb-1", "ada", GEOMETRY[0].item_id, FeedbackKind.COMPLETED, t0 + 1),
        encode_feedback_recorded("fb-x", "ada", "no-such-item", FeedbackKind.VIEWED, t0 + 1),
        skipped,
        skipped,  # published twice (an ambiguous send): applied once
    ]
    sync_bus.create_topic(settings.topic, 2)
    with sync_bus.producer() as producer:
        for event in events:
            producer.send(settings.topic, event.value, key=event.key, headers=event.headers)
        producer.flush()
    model = RecommenderModel(CATALOG)
    worker = RecommenderWorker(sync_bus, model, lambda snapshot: None, settings)
    _run_until(worker, lambda: worker.stats.records_consumed == 5)
    assert (worker.stats.events_applied, worker.stats.feedback_applied) == (3, 2)
    assert (worker.stats.duplicates, worker.stats.dead_lettered) == (1, 1)
    assert model.skipped("ada") == (GEOMETRY[1].item_id,) and model.clock_s == t0 + 2
    with sync_bus.consumer(unique("dlq-reader"), [settings.dead_letter_topic]) as consumer:
        (dead,) = poll_until(consumer, 1)
    assert dead.value == events[2].value
    assert b"no-such-item" in (dead.header("dlq-error") or b"")


# --- a query replica records feedback; the trainer learns it --------------------------------------


async def test_a_query_replica_publishes_feedback_and_serves_the_trainers_result(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    def settings(role: str, name: str) -> RecommenderSettings:
        return RecommenderSettings(
            port=0, metrics_port=0, role=role, snapshot_dir=str(tmp_path / "snapshots"),
            checkpoint_dir=tmp_path / name, batch_max_wait_ms=10, publish_interval_s=0.05,
            poll_interval_s=0.05,
        )  # fmt: skip

    replica = await QueryApp.start(settings("query", "replica"), bus)
    trainer: TrainerApp | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # no snapshot: cannot check the item yet
                await _feedback(stub, "ada", GEOMETRY[0].item_id, COMPLETED)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            trainer = await TrainerApp.start(settings("trainer", "trainer"), bus)
            deadline = time.monotonic() + WAIT_S
            while not replica.service.has_snapshot:  # RecordFeedback checks items in the snapshot's catalog
                assert time.monotonic() < deadline, "the replica loaded no snapshot"
                await asyncio.sleep(0.02)
            assert (await _feedback(stub, "ada", GEOMETRY[0].item_id, COMPLETED)).accepted
            await _wait_applied(stub, 1)
            top = _ids(await _recommend(stub, "ada"))[0]
            assert (await _feedback(stub, "ada", top, SKIPPED)).accepted
            await _wait_applied(stub, 2)
            assert top not in _ids(await _recommend(stub, "ada"))
        assert trainer is not None and trainer.worker.stats.feedback_applied == 2
        assert not hasattr(replica, "worker") and replica.frontend.feedback.spool is None
    finally:
        await replica.stop()
        if trainer is not None:
            await trainer.stop()


async def test_a_query_replica_given_a_spool_directory_keeps_unconfirmed_feedback_on_disk(
    tmp_path: Path, bus: SqliteEventBus
) -> None:
    settings = RecommenderSettings(
        port=0, metrics_port=0, role="query", snapshot_dir=str(tmp_path / "snapshots"),
        checkpoint_dir=None, feedback_spool_dir=tmp_path / "replica-spool",
    )  # fmt: skip
    replica = await QueryApp.start(settings, bus)
    try:
        assert not hasattr(replica, "worker")
        assert replica.frontend.feedback.spool is not None
        assert replica.frontend.feedback.spool.directory == tmp_path / "replica-spool"
        assert (tmp_path / "replica-spool").is_dir()
    finally:
        await replica.stop()


# -- defects found from outside (issue 21) ----------------------------------------------------


def _timed(seconds: int, nanos: int = 0) -> recommender_pb2.RecordFeedbackRequest:
    request = recommender_pb2.RecordFeedbackRequest(
        user_id="ada", item_id=GEOMETRY[0].item_id, kind=COMPLETED
    )
    request.time.seconds, request.time.nanos = seconds, nanos
    return request


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(0, -1), (2**62, 0), (-(2**62), 0), (0, 1_000_000_000)], ids=str
)
async def test_an_out_of_range_timestamp_is_invalid_argument_in_words(
    app: TrainerApp, stub: recommender_pb2_grpc.RecommenderServiceStub, seconds: int, nanos: int
) -> None:
    # Was INTERNAL: Timestamp.ToNanoseconds() raised ValueError inside the servicer.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordFeedback(_timed(seconds, nanos), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "time is not a valid Timestamp" in (caught.value.details() or "")
    assert app.frontend.feedback.publisher.published == app.frontend.feedback.publisher.buffered == 0


async def test_the_epoch_is_a_time_in_the_past_and_1900_is_refused_for_what_it_is(
    stub: recommender_pb2_grpc.RecommenderServiceStub,
) -> None:
    # Both were refused as "time must be in the past".
    assert (await stub.RecordFeedback(_timed(0), timeout=5)).accepted
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordFeedback(_timed(-2_208_988_800), timeout=5)  # 1900-01-01
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "before 1970-01-01" in details and "in the past" not in details


@pytest.mark.parametrize("length", [129, 10_240])
async def test_every_rpc_has_one_user_id_limit_and_one_message(
    stub: recommender_pb2_grpc.RecommenderServiceStub, length: int
) -> None:
    # Recommend accepted 10 KB ids while RecordFeedback (and Classify) stopped at 128 characters.
    from snaplearn_common.ids import MAX_ID_CHARS

    expected = f"user_id is {length} characters; the limit is {MAX_ID_CHARS}"
    for call in (
        stub.Recommend(recommender_pb2.RecommendRequest(user_id="u" * length, k=5), timeout=5),
        stub.RecordFeedback(
            recommender_pb2.RecordFeedbackRequest(
                user_id="u" * length, item_id=GEOMETRY[0].item_id, kind=COMPLETED
            ),
            timeout=5,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == expected
    # The limit itself is accepted by both.
    assert (await stub.Recommend(recommender_pb2.RecommendRequest(user_id="u" * MAX_ID_CHARS, k=5))).items


async def test_a_user_id_that_is_not_utf8_is_invalid_argument_in_words(app: TrainerApp) -> None:
    # Was UNKNOWN: "Unexpected <class 'google.protobuf.message.DecodeError'>: ...".
    raw = b"\x0a\x02\xff\xfe" + recommender_pb2.RecommendRequest(k=5).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        for method in ("Recommend", "RecordFeedback"):
            call = channel.unary_unary(f"/snaplearn.recommender.v1.RecommenderService/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(raw, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            details = caught.value.details() or ""
            assert "not valid UTF-8" in details and "class" not in details


async def test_the_clis_json_keeps_non_ascii_text_readable(
    app: TrainerApp, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was: --json printed "\u00e9l\u00e8ve" for a student's "élève" id.
    item = GEOMETRY[1].item_id
    argv = [
        "--recommender",
        f"127.0.0.1:{app.port}",
        "--json",
        "feedback",
        "--user",
        "élève-7",
        "--item",
        item,
    ]
    assert await asyncio.to_thread(cli.main, [*argv, "--kind", "viewed", "--request-id", "élève-1"]) == 0
    out = capsys.readouterr().out
    assert '"eventId": "élève-1"' in out and "\\u" not in out
    recommend = ["--recommender", f"127.0.0.1:{app.port}", "--json", "recommend", "--user", "élève-7"]
    assert await asyncio.to_thread(cli.main, recommend) == 0
    out = capsys.readouterr().out
    assert '"userId": "élève-7"' in out and "\\u" not in out


async def test_item_ids_keep_the_same_limit_and_are_never_echoed_whole(
    stub: recommender_pb2_grpc.RecommenderServiceStub,
) -> None:
    # Was: SimilarItems and RecordFeedback answered NOT_FOUND quoting a 10 KB id back whole.
    from snaplearn_common.ids import MAX_ID_CHARS

    for call in (
        stub.SimilarItems(recommender_pb2.SimilarItemsRequest(item_id="i" * 10_000, k=3), timeout=5),
        stub.RecordFeedback(
            recommender_pb2.RecordFeedbackRequest(user_id="ada", item_id="i" * 10_000, kind=COMPLETED),
            timeout=5,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == f"item_id is 10000 characters; the limit is {MAX_ID_CHARS}"
