"""The rate-limit buckets shared by worker processes (SharedRateLimiter) and the per-item checks
of a ClassifyStream (ItemChecks): real files, real processes, a clock the test moves."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import pytest

from snaplearn_common.security.interceptor import ItemChecks
from snaplearn_common.security.principal import Principal
from snaplearn_common.security.ratelimit import RateLimiter, SharedRateLimiter


def test_two_openers_of_one_table_take_from_one_bucket(tmp_path: Path) -> None:
    table = SharedRateLimiter.create(tmp_path / "buckets")
    now = [100.0]
    first = SharedRateLimiter(table, rate_per_s=2.0, burst=3, clock=lambda: now[0])
    second = SharedRateLimiter(table, rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [first.take("a"), second.take("a"), first.take("a")] == [0.0, 0.0, 0.0]
    assert second.take("a") == pytest.approx(0.5)  # the bucket both took from is empty
    assert first.take("b") == 0.0  # another caller, its own bucket
    now[0] = 100.5
    assert second.take("a") == 0.0 and first.take("a") == pytest.approx(0.5)
    now[0] = 1000.0
    assert [first.take("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]  # refills to burst
    first.close()
    second.close()


def test_the_same_answers_as_the_in_process_limiter(tmp_path: Path) -> None:
    now = [5.0]
    shared = SharedRateLimiter(
        SharedRateLimiter.create(tmp_path / "buckets"), rate_per_s=3.0, burst=4, clock=lambda: now[0]
    )
    local = RateLimiter(rate_per_s=3.0, burst=4, clock=lambda: now[0])
    for step in range(200):
        now[0] += (step % 7) * 0.05
        caller = "abc"[step % 3]
        assert shared.take(caller) == pytest.approx(local.take(caller)), step
    shared.close()


def _take_many(path: str, calls: int) -> int:
    limiter = SharedRateLimiter(Path(path), rate_per_s=0.001, burst=40)
    allowed = sum(limiter.take("caller") == 0.0 for _ in range(calls))
    limiter.close()
    return allowed


def test_processes_taking_at_once_get_one_burst_between_them(tmp_path: Path) -> None:
    table = SharedRateLimiter.create(tmp_path / "buckets")
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        allowed = list(pool.map(_take_many, [str(table)] * 4, [200] * 4))
    # Per-process buckets would allow 4 x 40; one shared bucket allows its burst once.
    assert sum(allowed) == 40, allowed


def test_a_small_table_reuses_refilled_slots_and_keeps_limited_callers(tmp_path: Path) -> None:
    now = [0.0]
    limiter = SharedRateLimiter(
        SharedRateLimiter.create(tmp_path / "buckets", slots=8), rate_per_s=1.0, burst=2, clock=lambda: now[0]
    )
    limiter.take("limited")
    limiter.take("limited")  # empty at t=0
    for caller in range(100):  # far more callers than slots: each one's bucket is full again a second later
        now[0] += 1.0
        assert limiter.take(f"passing-{caller}") == 0.0
        assert limiter.take("limited") == 0.0  # the one token back in that second
        assert limiter.take("limited") > 0.0  # and no more: its bucket was kept, not given away
    limiter.close()


def test_a_file_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").write_bytes(b"not a table at all, but long enough")
    with pytest.raises(ValueError, match="not a rate-limit table"):
        SharedRateLimiter(tmp_path / "other", 1.0, 1)
    with pytest.raises(ValueError, match="at least"):
        SharedRateLimiter.create(tmp_path / "tiny", slots=2)


def test_item_checks_expiry_tenant_and_rate() -> None:
    now = time.time()
    limiter = RateLimiter(rate_per_s=0.001, burst=2)
    school = Principal("app-a", frozenset({"classify"}), frozenset({"school-a"}), expires_at=now + 300)
    checks = ItemChecks(school, limiter, "app-a", leeway_s=30.0)
    assert checks.refusal("school-a/s1") is None
    refusal = checks.refusal("school-b/s1")
    assert refusal is not None and refusal[0] == grpc.StatusCode.PERMISSION_DENIED
    assert "school-b/s1" in refusal[1]
    limited = checks.refusal("school-a/s1")  # the refused item took no token: this is the second
    assert limited is None
    limited = checks.refusal("school-a/s1")
    assert limited is not None and limited[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in" in limited[1]
    # Within the verifier's leeway past exp an item is accepted, as a Classify call would be.
    late = Principal("app-a", frozenset({"classify"}), frozenset({"*"}), expires_at=now - 20)
    assert ItemChecks(late, None, "app-a", leeway_s=30.0).refusal("s") is None
    expired = Principal("app-a", frozenset({"classify"}), frozenset({"*"}), expires_at=now - 31)
    assert ItemChecks(expired, None, "app-a", leeway_s=30.0).refusal("s") == (
        grpc.StatusCode.UNAUTHENTICATED,
        "the token has expired",
    )
    assert ItemChecks(None, None, "127.0.0.1").refusal("anyone") is None  # no authentication, no limit
