"""The Python client library and `snaplearn-client` against the real recommender (grpc.aio on
port 0, real SqliteEventBus, real LightFM model): attempts with an outcome and a score, a
student's state (mastery, attempts, recommendations with reasons), and filters on a catalog's
declared features, through RecommenderClient and the CLI alike."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from snaplearn.recommender.v1 import recommender_pb2
from snaplearn_client import cli
from snaplearn_client.client import RecommenderClient
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.trainer import TrainerApp
from tests.helpers.catalogs import SCHOOL_DECLARATION as DECLARATION
from tests.helpers.recommender import in_process_settings

WAIT_S = 30.0
CORRECT = recommender_pb2.ATTEMPT_OUTCOME_CORRECT
INCORRECT = recommender_pb2.ATTEMPT_OUTCOME_INCORRECT
# The sample catalog chains each topic: geometry-002 needs geometry-001, and so on.
FIRST, SECOND = "geometry-001", "geometry-002"
ROWS = [
    "Exercise ID,Title,Concepts,Topic,Areas,Minutes,Needs",
    "frac-1,Comparing fractions,fractions,Fractions,number|visual,5,",
    "frac-2,Fractions on a number line,fractions,Fractions,number,15,frac-1",
    "frac-3,Adding fractions,fractions,Fractions,number,25,frac-2",
    "geo-1,Angles in a triangle,geometry,Geometry,shape|visual,12,",
    "geo-2,Área de rectángulos,geometry,Geometry,shape|number,18,geo-1",
    "geo-3,Volume of prisms,geometry;multiplication,Geometry,shape,30,geo-2",
    "mul-1,Times tables,multiplication,Arithmetic,number,8,",
]


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    event_bus = SqliteEventBus(tmp_path / "bus.db")
    yield event_bus
    event_bus.close()


async def _started(
    settings: RecommenderSettings, bus: SqliteEventBus
) -> tuple[TrainerApp, RecommenderClient]:
    app = await TrainerApp.start(settings, bus)
    return app, RecommenderClient(f"127.0.0.1:{app.port}", timeout_s=5.0)


async def _wait_applied(client: RecommenderClient, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while (applied := (await asyncio.to_thread(client.recommend, "probe", 1)).events_applied) < count:
        assert time.monotonic() < deadline, f"{applied} of {count} events applied within {WAIT_S} s"
        await asyncio.sleep(0.02)


async def _cli(capsys: pytest.CaptureFixture[str], port: int, *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(cli.main, ["--recommender", f"127.0.0.1:{port}", "--timeout", "5", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


async def test_attempts_and_student_state_through_the_client_and_the_cli(
    tmp_path: Path, bus: SqliteEventBus, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = in_process_settings(tmp_path / "checkpoints", practise_band="0.5 0.95", mastery_threshold=0.6)
    app, client = await _started(settings, bus)
    try:
        first = await asyncio.to_thread(
            client.record_feedback, "zoë", FIRST, "completed", outcome="incorrect"
        )
        assert first.accepted
        rc, out, err = await _cli(
            capsys, app.port, "feedback", "--user", "zoë", "--item", FIRST, "--kind", "completed",
            "--outcome", "correct", "--score", "0.9", "--request-id", "zoe-2",
        )  # fmt: skip
        assert (rc, err) == (0, "")
        assert out.strip() == f"completed, correct, score 0.9 {FIRST} for zoë: recorded (event zoe-2)"
        # A score alone is an attempt too (at least 0.5: correct); an ATTEMPT_OUTCOME_* value works.
        await asyncio.to_thread(client.record_feedback, "zoë", SECOND, "completed", score=0.75)
        await asyncio.to_thread(client.record_feedback, "zoë", SECOND, "completed", outcome=CORRECT)
        await _wait_applied(client, 4)

        state = await asyncio.to_thread(client.student_state, "zoë", 5)
        assert state.user_id == "zoë" and state.events_applied == 4
        assert [(c.concept, c.correct, c.incorrect) for c in state.concepts] == [("geometry", 3, 1)]
        geometry = state.concepts[0]
        assert 0 < geometry.mastery < 1 and geometry.mastered == (geometry.mastery >= 0.6)
        attempts = [
            (a.item_id, a.outcome, a.score if a.HasField("score") else None) for a in state.recent_attempts
        ]
        assert attempts == [
            (FIRST, INCORRECT, None),
            (FIRST, CORRECT, pytest.approx(0.9)),
            (SECOND, CORRECT, pytest.approx(0.75)),  # the server says what the score meant
            (SECOND, CORRECT, None),
        ]
        assert len(state.recommended) == 5 and all(item.reason for item in state.recommended)
        recommended = await asyncio.to_thread(client.recommend, "zoë", 5)
        assert [(i.item_id, i.reason) for i in state.recommended] == [
            (i.item_id, i.reason) for i in recommended.items
        ]

        rc, out, err = await _cli(capsys, app.port, "student-state", "--user", "zoë", "--k", "5")
        assert (rc, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == f"student zoë, model {state.model_version}, 4 events"
        assert lines[1] == "mastery (weakest first):"
        mark = "mastered" if geometry.mastered else "practising"
        assert lines[2].split() == [
            "geometry",
            f"{geometry.mastery:.2f}",
            mark,
            "(3",
            "right,",
            "1",
            "wrong)",
        ]
        assert lines[3] == "recent attempts (oldest first):"
        shown = [line.split()[2:4] for line in lines[4:8]]
        assert shown == [[FIRST, "incorrect"], [FIRST, "correct"], [SECOND, "correct"], [SECOND, "correct"]]
        assert "score 0.90" in lines[5] and "score 0.75" in lines[6] and "score" not in lines[4]
        assert lines[8] == "recommended:"
        for rank, item in enumerate(state.recommended, 1):
            assert lines[7 + 2 * rank].strip().startswith(f"{rank}. {item.title}  [")
            assert lines[8 + 2 * rank].strip() == item.reason

        rc, out, err = await _cli(capsys, app.port, "--json", "student-state", "--user", "zoë", "--k", "5")
        assert (rc, err) == (0, "")
        assert '"userId": "zoë"' in out  # non-ASCII kept, not \u-escaped
        document = json.loads(out)
        assert [c["concept"] for c in document["concepts"]] == ["geometry"]
        assert [a["itemId"] for a in document["recentAttempts"]] == [FIRST, FIRST, SECOND, SECOND]
        assert [r["reason"] for r in document["recommended"]] == [i.reason for i in state.recommended]

        # What the server refuses, in words: an unknown student, a score outside [0, 1].
        with pytest.raises(grpc.RpcError) as error:
            await asyncio.to_thread(client.student_state, "nobody")
        assert error.value.code() is grpc.StatusCode.NOT_FOUND
        rc, out, err = await _cli(capsys, app.port, "student-state", "--user", "nobody")
        assert (rc, out) == (1, "")
        assert err.startswith("error: NOT_FOUND: ") and "no events of student 'nobody'" in err
        with pytest.raises(grpc.RpcError) as error:
            await asyncio.to_thread(client.record_feedback, "zoë", FIRST, "completed", score=1.5)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "score must be a number between 0 and 1" in (error.value.details() or "")
        # The client's own refusal comes before any call.
        with pytest.raises(ValueError, match="outcome must be one of correct, incorrect"):
            client.record_feedback("zoë", FIRST, "completed", outcome="right")
    finally:
        client.close()
        await app.stop()


def _settings_with_catalog(tmp_path: Path) -> RecommenderSettings:
    catalog = tmp_path / "school.csv"
    catalog.write_text("\r\n".join(ROWS) + "\r\n", encoding="utf-8")
    catalog.with_name("school.features.toml").write_text(DECLARATION, encoding="utf-8")
    return in_process_settings(tmp_path / "checkpoints", catalog_path=catalog)


def _ids(response: recommender_pb2.RecommendResponse | recommender_pb2.SimilarItemsResponse) -> list[str]:
    return sorted(item.item_id for item in response.items)


async def test_declared_feature_filters_through_the_client_and_the_cli(
    tmp_path: Path, bus: SqliteEventBus, capsys: pytest.CaptureFixture[str]
) -> None:
    app, client = await _started(_settings_with_catalog(tmp_path), bus)
    try:

        async def ids(**features: object) -> list[str]:
            return _ids(await asyncio.to_thread(client.recommend, "new", 100, features=features))

        assert await ids(topic=["Fractions"]) == ["frac-1", "frac-2", "frac-3"]
        assert await ids(topic="Geometry") == ["geo-1", "geo-2", "geo-3"]
        assert await ids(minutes=(None, 12)) == ["frac-1", "geo-1", "mul-1"]
        assert await ids(minutes=(15, 25)) == ["frac-2", "frac-3", "geo-2"]
        assert await ids(area=["visual"], minutes=(10, None)) == ["geo-1"]
        assert await ids(minutes={"values": [5, 8]}) == ["frac-1", "mul-1"]  # numbers compared as numbers
        messages = [
            recommender_pb2.FeatureFilter(name="area", values=["number"]),
            recommender_pb2.FeatureFilter(name="minutes", max=10),
        ]
        by_message = await asyncio.to_thread(client.recommend, "new", 100, features=messages)
        assert _ids(by_message) == ["frac-1", "mul-1"]
        similar = await asyncio.to_thread(
            client.similar_items, "geo-1", 10, features={"topic": ["Fractions"]}
        )
        assert _ids(similar) == ["frac-1", "frac-2", "frac-3"]

        with pytest.raises(grpc.RpcError) as error:
            await ids(colour=["red"])
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown feature 'colour'" in (error.value.details() or "")
        with pytest.raises(ValueError, match="feature 'minutes': max must be a finite number"):
            client.recommend("new", features={"minutes": {"max": "twenty"}})

        rc, out, err = await _cli(
            capsys, app.port, "--json", "recommend", "--user", "new", "--k", "100",
            "--feature", "topic=Fractions,Geometry", "--feature", "minutes<=20", "--feature", "minutes>=10",
        )  # fmt: skip
        assert (rc, err) == (0, "")
        assert "Área de rectángulos" in out  # non-ASCII kept
        assert sorted(item["itemId"] for item in json.loads(out)["items"]) == ["frac-2", "geo-1", "geo-2"]

        rc, out, err = await _cli(
            capsys,
            app.port,
            "similar",
            "--item",
            "frac-1",
            "--feature",
            "area=shape",
            "--feature",
            "minutes<=20",
        )
        assert (rc, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].startswith("like frac-1, model ")
        titles = sorted(line.strip().split(". ", 1)[1].split("  [")[0] for line in lines[1::2])
        assert titles == ["Angles in a triangle", "Área de rectángulos"]

        rc, out, err = await _cli(
            capsys, app.port, "recommend", "--user", "new", "--feature", "topic=Chemistry"
        )
        assert (rc, out) == (1, "")
        assert err.startswith("error: INVALID_ARGUMENT: ") and "unknown topic value(s) ['Chemistry']" in err
    finally:
        client.close()
        await app.stop()


async def test_forget_a_student_through_the_client_and_the_cli(
    tmp_path: Path, bus: SqliteEventBus, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = in_process_settings(tmp_path / "checkpoints")
    app, client = await _started(settings, bus)
    try:
        for user in ("ada", "bo"):
            await asyncio.to_thread(client.record_feedback, user, FIRST, "completed", outcome="correct")
        await _wait_applied(client, 2)
        assert not (await asyncio.to_thread(client.recommend, "ada", 3)).cold_start

        rc, out, err = await _cli(capsys, app.port, "forget", "--user", "ada", "--request-id", "gdpr-17")
        assert (rc, err) == (0, "")
        assert out.strip() == "ada: forgotten (tombstone event gdpr-17)"
        retry = await asyncio.to_thread(client.forget_student, "ada", "gdpr-17")
        assert (retry.accepted, retry.event_id) == (False, "gdpr-17")  # a retry publishes nothing
        await _wait_applied(client, 3)

        assert (await asyncio.to_thread(client.recommend, "ada", 3)).cold_start
        with pytest.raises(grpc.RpcError) as missing:
            await asyncio.to_thread(client.student_state, "ada")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (await asyncio.to_thread(client.recommend, "bo", 3)).cold_start  # only ada is gone
    finally:
        client.close()
        await app.stop()
