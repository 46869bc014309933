"""The soak command's report logic (snaplearn_bench.soak): RSS growth after warm-up, the targets, the page."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pytest

from snaplearn_bench.soak import (
    Sample,
    SoakResult,
    benchmarks_row,
    checks,
    cores_used,
    load_result,
    main,
    render,
    rss_growth,
    spread,
)

MB = 2**20


def _samples(vision_mb: Sequence[float], recommender_mb: Sequence[float], step_s: float = 10) -> list[Sample]:
    # The vision server uses half a core all along, the recommender a quarter; the load is 1.5.
    return [
        Sample(
            i * step_s,
            {"vision": int(v * MB), "recommender": int(r * MB)},
            10 * i,
            10 * i,
            10 * i,
            0,
            cpu_s={"vision": 0.5 * i * step_s, "recommender": 0.25 * i * step_s},
            load_1m=1.5,
        )
        for i, (v, r) in enumerate(zip(vision_mb, recommender_mb, strict=True))
    ]


def _result(samples: list[Sample], **fields: object) -> SoakResult:
    result = SoakResult(capacity_rps=50.0, rate_rps=35.0, minutes=1.0, warmup_minutes=0.5, samples=samples)
    result.statuses = {"OK": 900}
    result.capacity_ok, result.published, result.applied = 100, 1000, 1000
    result.send_lag_p99_ms, result.send_lag_max_ms = 12.0, 40.0
    for name, value in fields.items():
        setattr(result, name, value)
    return result


def test_growth_counts_from_the_end_of_the_warm_up_not_the_start() -> None:
    # Warm-up (t < 30 s) grows from 100 to 400 MB; afterwards the vision server is flat and the
    # recommender grows 10 %.
    vision = [100, 200, 300, 400, 400, 400, 400, 400, 400]
    recommender = [50, 80, 100, 100, 100, 100, 110, 110, 110]
    rows = {row.name: row for row in rss_growth(_samples(vision, recommender), warmup_s=30.0, window=3)}
    assert rows["vision"].after_warmup_mb == pytest.approx(400.0)
    assert rows["vision"].growth_pct == pytest.approx(0.0)
    assert rows["vision"].peak_mb == pytest.approx(400.0)
    assert rows["recommender"].after_warmup_mb == pytest.approx(100.0)
    assert rows["recommender"].end_mb == pytest.approx(110.0)
    assert rows["recommender"].growth_pct == pytest.approx(10.0)


def test_each_end_is_a_mean_so_one_noisy_sample_does_not_decide() -> None:
    vision = [100, 100, 100, 100, 100, 130, 100]  # one spike among the last three
    rows = rss_growth(_samples(vision, vision), warmup_s=0.0, window=3)
    assert rows[0].growth_pct == pytest.approx(10.0)
    assert rows[0].peak_mb == pytest.approx(130.0)


def test_no_sample_after_the_warm_up_is_an_error_not_a_pass() -> None:
    with pytest.raises(ValueError, match="warm-up"):
        rss_growth(_samples([100, 100], [100, 100]), warmup_s=60.0)


def test_a_clean_run_meets_every_target() -> None:
    found = checks(_result(_samples([100] * 9, [100] * 9)), max_rss_growth_pct=5.0)
    assert all(check.ok for check in found), found
    whats = [check.what for check in found]
    assert "RSS growth after warm-up, recommender" in whats and "RSS growth after warm-up, vision" in whats
    assert "events applied = events published (none lost, none twice)" in whats


@pytest.mark.parametrize(
    ("fields", "failed", "seen"),
    [
        ({"statuses": {"OK": 898, "DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}, "published": 998},
         "calls not answered OK",
         "DEADLINE_EXCEEDED 1, UNAVAILABLE 1"),
        ({"applied": 990}, "events applied = events published (none lost, none twice)", "990"),
        ({"applied": 1001}, "events applied = events published (none lost, none twice)", "1001"),
        ({"published": 999}, "events published = calls answered OK", "999"),
        ({"dropped": 3}, "events dropped by the publisher", "3"),
    ],
)  # fmt: skip
def test_each_missed_target_is_named_with_what_was_seen(
    fields: dict[str, object], failed: str, seen: str
) -> None:
    if "published" in fields:  # the model applied what was published: only the named target is missed
        fields = {**fields, "applied": fields["published"]}
    found = checks(_result(_samples([100] * 9, [100] * 9), **fields), max_rss_growth_pct=5.0)
    missed = [check for check in found if not check.ok]
    assert [(check.what, check.seen) for check in missed] == [(failed, seen)]


def test_rss_growth_over_the_limit_fails_that_process_only() -> None:
    found = checks(_result(_samples([100] * 9, [100] * 6 + [106] * 3)), max_rss_growth_pct=5.0)
    missed = [(check.what, check.seen) for check in found if not check.ok]
    assert missed == [("RSS growth after warm-up, recommender", "+6.0 %")]


def test_the_page_has_the_verdict_targets_and_one_row_per_sample() -> None:
    samples = _samples([100] * 4, [50] * 4)
    result = _result(samples, statuses={"OK": 899, "UNAVAILABLE": 1}, warmup_minutes=0.0)
    page = render(result, checks(result, 5.0), "python benchmarks/soak.py --minutes 1", {"bus": "embedded"})
    assert "Command: `python benchmarks/soak.py --minutes 1`" in page
    assert "**Verdict: FAIL**" in page
    assert "| calls not answered OK | 0 | UNAVAILABLE 1 | **no** |" in page
    assert (
        "| t (s) | recommender RSS (MB) | vision RSS (MB) | recommender cores | vision cores | load "
        "| published | applied | errors | late (ms) |"
    ) in page
    assert "| 30 | 50 | 100 | 0.25 | 0.50 | 1.50 | 30 | 30 | 0 | 0 |" in page
    assert "| 0 | 50 | 100 |  |  | 1.50 | 0 | 0 | 0 | 0 |" in page  # no cores before the first window
    assert sum(line.startswith("| ") and line[2].isdigit() for line in page.splitlines()) == len(samples)


def test_a_long_run_shows_evenly_spaced_rows_with_both_ends() -> None:
    samples = _samples([100] * 181, [50] * 181)
    shown = spread(samples, 7)
    assert [s.t_s for s in shown] == [0, 300, 600, 900, 1200, 1500, 1800]
    assert spread(samples[:5], 7) == samples[:5]
    page = render(_result(samples), [], "soak", {}, max_rows=7)
    assert "| 1800 | 50 | 100 | 0.25 | 0.50 | 1.50 | 1800 | 1800 | 0 | 0 |" in page and "| 10 |" not in page


def test_a_saved_run_is_judged_again_with_another_warm_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The recommender fills a bounded window in the first half, then is flat: a longer warm-up passes.
    samples = _samples([100] * 10, [100, 110, 120, 130, 140, 150, 150, 150, 150, 150])
    saved = tmp_path / "soak.json"
    saved.write_text(json.dumps(asdict(_result(samples, warmup_minutes=0.1))))
    assert load_result(json.loads(saved.read_text())) == _result(samples, warmup_minutes=0.1)

    assert main(["--from-json", str(saved)]) == 1
    assert "FAIL RSS growth after warm-up, recommender" in capsys.readouterr().out
    page = tmp_path / "soak.md"
    assert main(["--from-json", str(saved), "--warmup-minutes", "0.8", "--out", str(page)]) == 0
    assert "**Verdict: PASS**" in page.read_text() and "judged again from soak.json" in page.read_text()


def test_cores_are_the_cpu_seconds_of_each_window_per_second() -> None:
    samples = _samples([100] * 3, [50] * 3, step_s=20)
    samples[2].cpu_s["vision"] = samples[1].cpu_s["vision"] + 30.0  # 1.5 cores in the last window
    del samples[1].cpu_s["recommender"]  # the process was gone at that look: no figure, not zero
    assert cores_used(samples) == [{}, {"vision": pytest.approx(0.5)}, {"vision": pytest.approx(1.5)}]


def test_the_page_names_the_servers_reasons_the_lateness_and_the_load() -> None:
    samples = _samples([100] * 4, [50] * 4)
    samples[2].send_lag_max_ms, samples[2].errors = 420.0, 7
    result = _result(
        samples,
        statuses={"OK": 893, "RESOURCE_EXHAUSTED": 7},
        rejections={"queue_full": 7},
        send_lag_max_ms=420.0,
        load_before="0.12 0.30 0.41 1/150 2000",
        load_after="3.50 2.10 1.00 4/160 2100",
        published=993,
        applied=993,
    )
    page = render(result, checks(result, 5.0), "soak", {})
    assert "Capacity 50.0 Classify/s (closed loop), soak at 35.0/s" in page
    result.capacity_given = True
    assert "Capacity 50.0 Classify/s (given by --capacity)" in render(result, [], "soak", {})
    assert "Refused by the vision server, by its reason (snaplearn_vision_rejections): queue_full 7." in page
    assert "p99 12 ms, max 420 ms; machine load 0.12 0.30 0.41 before, 3.50 2.10 1.00 after." in page
    assert "| 20 | 50 | 100 | 0.25 | 0.50 | 1.50 | 20 | 20 | 7 | 420 |" in page


def test_the_benchmarks_row_says_errors_reasons_losses_rss_and_load() -> None:
    result = _result(
        _samples([100] * 9, [100] * 9),
        statuses={"OK": 897, "RESOURCE_EXHAUSTED": 3},
        rejections={"queue_full": 3},
        published=997,
        applied=996,
        load_before="0.10 0.20 0.30 1/1 1",
        load_after="1.00 2.00 3.00 1/1 1",
    )
    header, rule, row = benchmarks_row(result, checks(result, 5.0), "2026-12-08 02:20 UTC")
    assert header.count("|") == rule.count("|") == row.count("|") == 10
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == [
        "2026-12-08 02:20 UTC",
        "1 (0.5)",
        "50 / 35 per s",
        "900",
        "RESOURCE_EXHAUSTED 3 (0.33 %); server's reasons: queue_full 3",
        "996 of 997 published (1 lost, 0 dropped)",
        "recommender +0.0 % / vision +0.0 %",
        "0.10 0.20 0.30 / 1.00 2.00 3.00",
        "FAIL",
    ]
    clean = _result(_samples([100] * 9, [100] * 9))
    _, _, row = benchmarks_row(clean, checks(clean, 5.0), "now")
    assert "| 900 | 0 | 1,000 of 1,000 published (0 lost, 0 dropped) |" in row and row.endswith("| PASS |")


def test_a_run_prints_the_benchmarks_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "soak.json"
    saved.write_text(json.dumps(asdict(_result(_samples([100] * 9, [100] * 9)))))
    assert main(["--from-json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "For docs/BENCHMARKS.md (command: python benchmarks/soak.py --from-json " in out
    assert "| judged again from soak.json | 1 (0.5) | 50 / 35 per s | 900 | 0 |" in out
    assert not (tmp_path / "soak.md").exists()  # judging again writes a page only where told
