"""Freshness probes: how soon a change reaches Recommend, and the table that reports it.

Each probe starts from an idle system, makes one change through the path a real caller uses, and
polls the recommender over gRPC until its answer reflects that change; the sample is the time
from the change's call returning to the first answer that reflects it. "Reflects" is defined per
path, so that nothing but the change itself can satisfy it:

- photo: Classify for a user the model has never seen returns; Recommend for that user is no
  longer a cold start.
- catalog add: the catalog sync command's publish (`catalog_sync.publish_changes`, one copy per
  partition, flushed) returns for a new item whose feature value no other item has; Recommend
  filtered on that value returns the item (until then the value is unknown: INVALID_ARGUMENT).
- catalog change: the same publish of that item with a new feature value returns; Recommend
  filtered on the new value returns it.
- catalog retire: the same publish of that item's retirement returns; Recommend filtered on its
  value no longer returns it.
- answer: RecordFeedback (completed, outcome CORRECT or INCORRECT, alternating) returns for the
  first item of the student's Recommend (exclude_seen); Recommend no longer offers that item. A
  probe then checks that the student's GetStudentState shows the attempt with its outcome, so
  the answer was applied as an attempt (mastery), not only as a view.

The harness polls with a short pause between calls (POLL_PAUSE_S) so that the probe does not take
a core from the recommender it waits for; the pause bounds the resolution, far below the targets.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from snaplearn_bench.report import percentile

# The targets for p95 of every path (seconds), by bus backend.
TARGET_P95_S: dict[str, float] = {"embedded": 1.0, "kafka": 2.0}
BACKEND_NAMES: dict[str, str] = {"embedded": "embedded (SQLite WAL)", "kafka": "Apache Kafka (KRaft, local)"}

# path -> (row label, what starts the clock -> what stops it)
PATHS: dict[str, tuple[str, str]] = {
    "photo": ("photo", "Classify returns -> Recommend for the new user is no longer a cold start"),
    "catalog_add": (
        "catalog add",
        "sync publish returns -> Recommend filtered on the new item's feature returns it",
    ),
    "catalog_change": (
        "catalog change",
        "sync publish returns -> Recommend filtered on the item's new feature value returns it",
    ),
    "catalog_retire": (
        "catalog retire",
        "sync publish of the retirement returns -> Recommend filtered on its value no longer returns it",
    ),
    "answer": (
        "student's answer",
        "RecordFeedback (completed, outcome CORRECT or INCORRECT) returns -> the student's Recommend "
        "(exclude_seen) no longer offers the answered item; GetStudentState then shows the attempt",
    ),
}

POLL_PAUSE_S = 0.002
PROBE_TIMEOUT_S = 30.0
CALM_S = 0.05  # between probes: the worker goes idle again, each probe starts from a calm state
OUTCOMES = ("correct", "incorrect")


@dataclass(frozen=True, slots=True)
class Summary:
    """p50 / p95 / max of one path's samples, in seconds (nearest-rank percentiles)."""

    n: int
    p50_s: float
    p95_s: float
    max_s: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        ordered = sorted(samples)
        return cls(
            len(ordered),
            percentile(ordered, 0.50),
            percentile(ordered, 0.95),
            ordered[-1] if ordered else math.nan,
        )

    def as_ms(self) -> dict[str, float]:
        return {"n": self.n, "p50": self.p50_s * 1e3, "p95": self.p95_s * 1e3, "max": self.max_s * 1e3}

    @classmethod
    def from_ms(cls, values: Mapping[str, float]) -> Summary:
        return cls(int(values["n"]), values["p50"] / 1e3, values["p95"] / 1e3, values["max"] / 1e3)


def meets(backend: str, summary: Summary) -> bool:
    """Whether the path's p95 is within the backend's target (no samples: not met)."""
    target = TARGET_P95_S.get(backend)
    return target is not None and summary.n > 0 and summary.p95_s <= target


def poll_until(
    reached: Callable[[], bool], started: float, what: str, timeout_s: float = PROBE_TIMEOUT_S
) -> float:
    """Seconds from `started` (time.perf_counter) until `reached()` first returns True, calling it
    with a short pause between calls; TimeoutError naming `what` after timeout_s."""
    while not reached():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"{what}: not reflected by Recommend within {timeout_s:.0f} s")
        time.sleep(POLL_PAUSE_S)
    return time.perf_counter() - started


# -- the probes -----------------------------------------------------------------------------------


def photo_probes(vision: str, recommender: str, probes: int) -> list[float]:
    """Classify for a new user -> Recommend for that user is no longer a cold start."""
    from snaplearn_client import RecommenderClient, VisionClient
    from snaplearn_vision.worksheets import sample_image_bytes

    photo = sample_image_bytes("fractions", seed=11)
    samples = []
    with VisionClient(vision, timeout_s=30) as v, RecommenderClient(recommender) as r:
        v.classify(photo, "warm-up")  # the first photo opens connections: not a probe
        poll_until(partial(_known, r, "warm-up"), time.perf_counter(), "photo warm-up")
        time.sleep(CALM_S)
        for i in range(probes):
            user = f"fresh-{uuid.uuid4().hex[:10]}"
            v.classify(photo, user)
            returned = time.perf_counter()
            samples.append(poll_until(partial(_known, r, user), returned, f"photo probe {i}"))
            time.sleep(CALM_S)
    return samples


def _known(client: Any, user: str) -> bool:
    """Whether Recommend knows `user` (no longer a cold start)."""
    return not client.recommend(user, k=1).cold_start


def _returns_item(client: Any, item_id: str, value: str) -> bool:
    """Whether Recommend filtered on `batch=value` returns item_id (an unknown value: not yet)."""
    try:
        answer = client.recommend("freshness-cold", k=1, features={"batch": [value]})
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return False
    return any(item.item_id == item_id for item in answer.items)


def _not_returned(client: Any, item_id: str, value: str) -> bool:
    return not _returns_item(client, item_id, value)


def catalog_probes(bus: Any, topic: str, partitions: int, recommender: str, probes: int) -> dict[str, Any]:
    """Per probe, one item's life as the sync command publishes it: added, then changed (its
    feature value), then retired, each timed into Recommend. Returns each path's samples and the
    publish calls' own durations ("publish")."""
    from snaplearn_client import RecommenderClient
    from snaplearn_recommender.catalog import CatalogDiff, LearningItem
    from snaplearn_recommender.catalog_sync import publish_changes

    run = uuid.uuid4().hex[:6]
    samples: dict[str, list[float]] = {"catalog_add": [], "catalog_change": [], "catalog_retire": []}
    publish: list[float] = []

    def timed(path: str, changes: Any, reached: Callable[[], bool], i: int) -> None:
        called = time.perf_counter()
        publish_changes(bus, topic, partitions, changes)
        returned = time.perf_counter()
        publish.append(returned - called)
        samples[path].append(poll_until(reached, returned, f"{PATHS[path][0]} probe {i}"))
        time.sleep(CALM_S)

    with RecommenderClient(recommender) as client:
        for i in range(probes):
            value, changed = f"{run}-{i}", f"{run}-{i}-changed"
            item = LearningItem(
                f"fresh-item-{value}", f"Fresh item {value}", ("fractions",), features={"batch": (value,)}
            )
            new = LearningItem(item.item_id, item.title, item.concepts, features={"batch": (changed,)})
            timed(
                "catalog_add",
                CatalogDiff((item,), (), ()),
                partial(_returns_item, client, item.item_id, value),
                i,
            )
            timed(
                "catalog_change",
                CatalogDiff((), (new,), ()),
                partial(_returns_item, client, item.item_id, changed),
                i,
            )
            timed(
                "catalog_retire",
                CatalogDiff((), (), (item.item_id,)),
                partial(_not_returned, client, item.item_id, changed),
                i,
            )
    return {**samples, "publish": publish}


def _offered(client: Any, user: str) -> list[str]:
    return [item.item_id for item in client.recommend(user, k=10, exclude_seen=True).items]


def _not_offered(client: Any, user: str, item_id: str) -> bool:
    return item_id not in _offered(client, user)


def answer_probes(recommender: str, probes: int) -> list[float]:
    """Per probe, a new student answers one item (warm-up, not timed) so that Recommend knows them
    and goes through practise-next; then answers the first item Recommend offers, timed until
    Recommend stops offering it; then GetStudentState must show that attempt."""
    from snaplearn_client import RecommenderClient

    samples = []
    with RecommenderClient(recommender) as client:
        first = client.recommend("freshness-cold", k=1).items[0].item_id
        for i in range(probes):
            user = f"student-{uuid.uuid4().hex[:10]}"
            client.record_feedback(user, first, "completed", outcome="correct")
            poll_until(
                partial(_known, client, user),
                time.perf_counter(),
                f"answer probe {i} (warm-up)",
            )
            time.sleep(CALM_S)
            item_id = _offered(client, user)[0]
            outcome = OUTCOMES[i % 2]
            client.record_feedback(user, item_id, "completed", outcome=outcome)
            returned = time.perf_counter()
            samples.append(
                poll_until(
                    partial(_not_offered, client, user, item_id),
                    returned,
                    f"answer probe {i}",
                )
            )
            check_attempt_shown(client.student_state(user), item_id, outcome)
            time.sleep(CALM_S)
    return samples


def check_attempt_shown(state: Any, item_id: str, outcome: str) -> None:
    """RuntimeError unless GetStudentState's latest attempt is `item_id` with `outcome`."""
    from snaplearn.recommender.v1 import recommender_pb2

    wanted = {
        "correct": recommender_pb2.ATTEMPT_OUTCOME_CORRECT,
        "incorrect": recommender_pb2.ATTEMPT_OUTCOME_INCORRECT,
    }
    latest = state.recent_attempts[-1] if state.recent_attempts else None
    if latest is None or latest.item_id != item_id or latest.outcome != wanted[outcome]:
        shown = [(a.item_id, a.outcome) for a in state.recent_attempts]
        raise RuntimeError(
            f"Recommend reflected the answer to {item_id!r} ({outcome}) but GetStudentState's "
            f"attempts are {shown}"
        )


# -- the report -----------------------------------------------------------------------------------


def _cell(summary: Summary | None) -> str:
    if summary is None or summary.n == 0:
        return "not run"
    return f"{summary.p50_s * 1e3:.0f} / {summary.p95_s * 1e3:.0f} / {summary.max_s * 1e3:.0f} ms"


def _target_cell(backend: str, summary: Summary | None) -> str:
    if backend not in TARGET_P95_S:
        return "no target"
    target = f"<= {TARGET_P95_S[backend]:g} s"
    if summary is None or summary.n == 0:
        return target
    return f"{target}: {'met' if meets(backend, summary) else '**missed**'}"


def freshness_table(results: Mapping[str, Mapping[str, Summary]]) -> list[str]:
    """Markdown rows: one per path, the backends side by side (p50 / p95 / max, then the p95
    target and whether it was met)."""
    backends = [b for b in TARGET_P95_S if b in results] + [b for b in results if b not in TARGET_P95_S]
    header = "| change -> Recommend | " + " | ".join(
        f"{BACKEND_NAMES.get(b, b)} p50 / p95 / max | target p95" for b in backends
    )
    lines = [header + " |", "|---|" + "---:|---:|" * len(backends)]
    for path, (label, _) in PATHS.items():
        if not any(path in results[b] for b in backends):
            continue
        cells = []
        for backend in backends:
            summary = results[backend].get(path)
            cells += [_cell(summary), _target_cell(backend, summary)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def definitions() -> list[str]:
    """One bullet per path: what starts and what stops its clock."""
    return [f"- **{label}**: {span}." for label, span in PATHS.values()]


def missed(results: Mapping[str, Mapping[str, Summary]]) -> list[str]:
    """'<backend> <path>' for every measured path whose p95 is over its target."""
    return [
        f"{backend} {PATHS[path][0]}"
        for backend, paths in results.items()
        for path, summary in paths.items()
        if path in PATHS and backend in TARGET_P95_S and summary.n and not meets(backend, summary)
    ]
