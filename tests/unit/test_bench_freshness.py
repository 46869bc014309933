"""The freshness benchmark's report logic (snaplearn_bench.freshness, snaplearn_bench.bus_freshness):
summaries, the paths x backends table with its targets, the page, the polling and the attempt check."""

from __future__ import annotations

import argparse
import json
import math
import re
import time

import pytest

from snaplearn.recommender.v1 import recommender_pb2
from snaplearn_bench.bus_freshness import freshness_summaries, render
from snaplearn_bench.freshness import (
    PATHS,
    Summary,
    check_attempt_shown,
    definitions,
    freshness_table,
    meets,
    missed,
    poll_until,
)


def _ms(p50: float, p95: float, top: float, n: int = 40) -> dict[str, float]:
    return {"n": n, "p50": p50, "p95": p95, "max": top}


def _results(kafka_answer_p95_ms: float = 90.0) -> dict[str, dict[str, object]]:
    """Raw results as run_backend returns them, for both buses."""

    def backend(base: float, answer_p95: float, publish_ms: float, events_per_s: float) -> dict[str, object]:
        return {
            "publish_cost": {"noop_p50_ms": 8.8, "publisher_p50_ms": 8.9, "paired_diff_p50_ms": 0.11},
            "freshness_ms": {
                "photo": _ms(base, base + 2, base + 3),
                "catalog_add": _ms(base - 4, base - 2, base - 1),
                "catalog_change": _ms(base - 6, base - 1, base + 9),
                "catalog_retire": _ms(base - 5, base - 3, base - 2),
                "answer": _ms(base + 1, answer_p95, answer_p95 + 10),
                "catalog_publish_call": _ms(publish_ms, publish_ms + 1, publish_ms + 2, n=80),
            },
            "throughput": {"events": 5000, "events_per_s": events_per_s},
        }

    return {
        "embedded": backend(60.0, 70.0, 2.7, 10086.0),
        "kafka": backend(72.0, kafka_answer_p95_ms, 143.0, 4024.0),
    }


def _args() -> argparse.Namespace:
    return argparse.Namespace(probes=40, events=5000, classify_calls=150)


def test_summary_uses_nearest_rank_percentiles_and_the_maximum() -> None:
    samples = [i / 100 for i in range(20, 0, -1)]  # 0.20 .. 0.01, unsorted on purpose
    summary = Summary.of(samples)
    assert summary.n == 20
    assert summary.p50_s == pytest.approx(0.11)  # index round(0.5 * 19) = 10 of 0.01..0.20
    assert summary.p95_s == pytest.approx(0.19)  # index round(0.95 * 19) = 18
    assert summary.max_s == pytest.approx(0.20)
    assert Summary.from_ms(summary.as_ms()) == pytest.approx(summary)
    assert summary.as_ms() == pytest.approx({"n": 20, "p50": 110.0, "p95": 190.0, "max": 200.0})


def test_an_empty_summary_is_nan_and_never_meets_a_target() -> None:
    empty = Summary.of([])
    assert empty.n == 0 and math.isnan(empty.p95_s) and math.isnan(empty.max_s)
    assert not meets("embedded", empty)


def test_targets_are_one_second_embedded_and_two_on_kafka_inclusive() -> None:
    at_one = Summary(40, 0.5, 1.0, 1.2)
    assert meets("embedded", at_one) and meets("kafka", at_one)
    over_one = Summary(40, 0.5, 1.001, 1.2)
    assert not meets("embedded", over_one) and meets("kafka", over_one)
    assert not meets("kafka", Summary(40, 0.5, 2.001, 3.0))
    assert not meets("some-other-bus", at_one)  # no target: never reported as met


def test_table_puts_the_buses_side_by_side_with_their_targets() -> None:
    lines = freshness_table(freshness_summaries(_results()))
    assert lines[0] == (
        "| change -> Recommend | embedded (SQLite WAL) p50 / p95 / max | target p95 "
        "| Apache Kafka (KRaft, local) p50 / p95 / max | target p95 |"
    )
    assert lines[1] == "|---|---:|---:|---:|---:|"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert list(rows) == ["photo", "catalog add", "catalog change", "catalog retire", "student's answer"]
    assert rows["catalog change"] == (
        "| catalog change | 54 / 59 / 69 ms | <= 1 s: met | 66 / 71 / 81 ms | <= 2 s: met |"
    )
    assert rows["photo"] == "| photo | 60 / 62 / 63 ms | <= 1 s: met | 72 / 74 / 75 ms | <= 2 s: met |"
    assert rows["student's answer"] == (
        "| student's answer | 61 / 70 / 80 ms | <= 1 s: met | 73 / 90 / 100 ms | <= 2 s: met |"
    )
    # The catalog publish call's own duration is not a path of the table.
    assert not any("publish" in line for line in lines)


def test_a_missed_target_is_marked_in_the_table_and_listed() -> None:
    summaries = freshness_summaries(_results(kafka_answer_p95_ms=2500.0))
    answer = next(line for line in freshness_table(summaries) if line.startswith("| student's answer"))
    assert answer.endswith("| 73 / 2500 / 2510 ms | <= 2 s: **missed** |")
    assert missed(summaries) == ["kafka student's answer"]
    assert missed(freshness_summaries(_results())) == []


def test_a_path_one_bus_did_not_run_says_so() -> None:
    results = _results()
    del results["kafka"]["freshness_ms"]["answer"]  # type: ignore[attr-defined]
    lines = freshness_table(freshness_summaries(results))
    answer = next(line for line in lines if line.startswith("| student's answer"))
    assert answer.endswith("| not run | <= 2 s |")


def test_only_the_buses_that_ran_get_columns() -> None:
    results = {"kafka": _results()["kafka"]}
    lines = freshness_table(freshness_summaries(results))
    assert "embedded" not in lines[0] and "Apache Kafka" in lines[0]
    assert lines[1] == "|---|---:|---:|"


def test_every_path_is_defined_by_what_starts_and_stops_its_clock() -> None:
    text = "\n".join(definitions())
    for label, _ in PATHS.values():
        assert f"- **{label}**:" in text
    assert "RecordFeedback (completed, outcome CORRECT or INCORRECT) returns" in text
    assert "GetStudentState then shows the attempt" in text
    assert "sync publish returns" in text
    assert "no longer a cold start" in text


def test_page_has_the_table_verdict_definitions_load_and_raw_numbers() -> None:
    results = _results()
    page = render(results, _args(), wall_s=300.0, load=("0.10 0.20 0.30 1/100 5", "1.50 0.90 0.40 2/110 9"))
    assert page.startswith("# Event bus: freshness into Recommend, throughput, cost of publishing\n")
    assert "`python benchmarks/bus_freshness.py --out docs/benchmarks/bus.md` (~5 min here" in page
    assert "before `0.10 0.20 0.30 1/100 5`, after `1.50 0.90 0.40 2/110 9`" in page
    assert "## Freshness: a change's call returns -> Recommend reflects it (40 probes a path)" in page
    assert "| catalog add | 56 / 58 / 59 ms | <= 1 s: met | 68 / 70 / 71 ms | <= 2 s: met |" in page
    assert "Every measured path meets its target (p95 <= 1 s embedded, <= 2 s Kafka)." in page
    assert "the publish call itself took p50 embedded 3 ms, kafka 143 ms" in page
    assert "| embedded | 10086 | 8.8 | 8.9 | +0.11 |" in page
    assert "| kafka | 4024 | 8.8 | 8.9 | +0.11 |" in page
    raw = re.search(r"```json\n(.*)\n```", page, re.S)
    assert raw is not None and json.loads(raw.group(1)) == results


def test_page_names_the_missed_targets() -> None:
    page = render(_results(kafka_answer_p95_ms=2500.0), _args(), wall_s=60.0)
    assert "Targets missed: kafka student's answer." in page
    assert "Every measured path meets" not in page
    assert "Machine load" not in page  # no load given, no line


def test_poll_until_returns_once_reached() -> None:
    answers = iter([False, False, True])
    calls = []

    def reached() -> bool:
        calls.append(1)
        return next(answers)

    started = time.perf_counter()
    elapsed = poll_until(reached, started, "probe")
    assert len(calls) == 3
    assert 0 < elapsed <= time.perf_counter() - started


def test_poll_until_names_the_probe_when_it_times_out() -> None:
    with pytest.raises(TimeoutError, match=r"answer probe 3: not reflected by Recommend within 0 s"):
        poll_until(lambda: False, time.perf_counter(), "answer probe 3", timeout_s=0.0)


def _state(
    *attempts: tuple[str, recommender_pb2.AttemptOutcome],
) -> recommender_pb2.GetStudentStateResponse:
    return recommender_pb2.GetStudentStateResponse(
        user_id="s",
        recent_attempts=[recommender_pb2.StudentAttempt(item_id=i, outcome=o) for i, o in attempts],
    )


def test_the_attempt_check_wants_the_latest_attempt_with_its_outcome() -> None:
    correct, incorrect = recommender_pb2.ATTEMPT_OUTCOME_CORRECT, recommender_pb2.ATTEMPT_OUTCOME_INCORRECT
    check_attempt_shown(_state(("warm", correct), ("x", incorrect)), "x", "incorrect")
    with pytest.raises(RuntimeError, match=r"answer to 'x' \(correct\)"):
        check_attempt_shown(_state(("warm", correct), ("x", incorrect)), "x", "correct")
    with pytest.raises(RuntimeError, match="GetStudentState's attempts are"):
        check_attempt_shown(_state(("x", correct), ("warm", correct)), "x", "correct")
    with pytest.raises(RuntimeError, match=r"attempts are \[\]"):
        check_attempt_shown(_state(), "x", "correct")
