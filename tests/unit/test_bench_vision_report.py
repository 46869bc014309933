"""snaplearn_bench.vision_report: the target checks per configuration, and the committed report
re-rendered from its saved numbers (real data: docs/benchmarks/vision.json)."""

from __future__ import annotations

import json
from typing import Any

from snaplearn_bench import vision_report
from snaplearn_bench.paths import REPO


def configuration(
    capacity: float, half_p99: float, compute_ms: float, refusal: float, goodput: float
) -> dict:
    return {
        "closed": {"throughput": capacity},
        "half": {"p99_ms": half_p99, "server": {"mean_batch_compute_ms": compute_ms}},
        "overload": {"rejected_p99_ms": refusal, "throughput": goodput},
    }


def run(**configurations: dict[str, Any]) -> dict[str, Any]:
    return {
        "raw": {"images_per_s": 1000.0},
        "max_queue_delay_ms": 5.0,
        "workers": 2,
        "ours-1": {"closed": {"throughput": 400.0}},
        "ray": {"closed": {"throughput": 500.0}},
        "litserve": {"closed": {"throughput": 900.0}},
        **configurations,
    }


def test_each_target_is_met_or_missed_by_its_own_numbers() -> None:
    runs = [
        run(
            ours=configuration(950.0, half_p99=8.0, compute_ms=2.0, refusal=12.0, goodput=800.0),
            **{
                "ours-workers": configuration(
                    850.0, half_p99=10.0, compute_ms=2.0, refusal=5.0, goodput=860.0
                )
            },
        )
    ]
    ours = {target: (measured, met) for target, measured, met in vision_report.target_checks(runs, "ours")}
    assert ours["capacity >= 90% of the raw bound"] == ("95%", True)
    assert ours["capacity above every peer"] == ("1.90x ray, 1.06x litserve", True)
    assert ours["p99 at half load <= max queue delay + 2 x batch compute"] == (
        "8 ms vs 5 + 2 x 2.0 = 9 ms",
        True,
    )
    assert ours["refusals at 3x overload answered in < 10 ms at p99"] == ("12.0 ms", False)
    assert ours["goodput at 3x overload >= 90% of capacity"] == ("84%", False)
    assert ours["dynamic batching vs batching off (one process)"] == ("2.38x the capacity", True)
    workers = {t: (m, ok) for t, m, ok in vision_report.target_checks(runs, "ours-workers")}
    assert workers["capacity >= 90% of the raw bound"] == ("85%", False)
    assert workers["capacity above every peer"][1] is False  # 0.94x LitServe
    assert workers["p99 at half load <= max queue delay + 2 x batch compute"][1] is False
    assert workers["refusals at 3x overload answered in < 10 ms at p99"] == ("5.0 ms", True)
    assert workers["goodput at 3x overload >= 90% of capacity"] == ("101%", True)


def test_ratios_are_medians_of_within_run_ratios() -> None:
    runs = [run(ours=configuration(c, 1.0, 1.0, 1.0, 1.0)) for c in (500.0, 950.0, 990.0)]
    runs[1]["raw"]["images_per_s"] = 2000.0  # 950 / 2000 in that run, not 950 / 1000
    (_, measured, met) = vision_report.target_checks(runs, "ours")[0]
    assert (measured, met) == ("50%", False)  # median of 50%, 47.5%, 99%


def test_the_committed_report_re_renders_with_a_column_per_configuration() -> None:
    saved = json.loads((REPO / "docs" / "benchmarks" / "vision.json").read_text())  # committed
    report = vision_report.report(saved["runs"], saved["meta"])
    configurations = [
        c for c in vision_report.CONFIGURATIONS if c in saved["runs"][0][next(iter(saved["runs"][0]))]
    ]
    header = next(line for line in report.splitlines() if line.startswith("| target |"))
    assert header.count("|") == len(configurations) + 2
    for model in saved["runs"][0]:
        assert f"## {model}" in report
    assert report.count("| capacity >= 90% of the raw bound |") == len(saved["runs"][0])


def test_one_process_behind_the_gateway_has_a_targets_column_of_its_own() -> None:
    runs = [
        run(
            ours=configuration(800.0, 8.0, 2.0, 900.0, 300.0),
            **{"ours-gateway-one": configuration(1200.0, 20.0, 2.0, 6.0, 1100.0)},
        )
    ]
    targets = vision_report.targets(runs)
    header = next(line for line in targets if line.startswith("| target |"))
    assert header == "| target | one process | one process behind the gateway |"
    capacity = next(line for line in targets if line.startswith("| capacity above every peer |"))
    assert capacity == (
        "| capacity above every peer | **missed**: 1.60x ray, 0.89x litserve "
        "| met: 2.40x ray, 1.33x litserve |"
    )
    refusal = next(line for line in targets if line.startswith("| refusals at 3x"))
    assert refusal.endswith("| **missed**: 900.0 ms | met: 6.0 ms |")


def test_cpu_per_photo_is_tabled_for_our_configurations_when_measured() -> None:
    saved = json.loads((REPO / "docs" / "benchmarks" / "vision.json").read_text())
    runs, meta = saved["runs"], saved["meta"]
    assert len(runs) == 3
    model, unmeasured = list(runs[0])[:2]
    for run_ in runs:  # as in reports from before the CPU was measured
        for result in run_[unmeasured].values():
            if isinstance(result, dict):
                result.pop("cpu_us_per_image", None)
                result.get("closed", {}).pop("cpu_us_per_image", None)
    for index, run_ in enumerate(runs):
        measured = run_[model]
        measured["raw"]["cpu_us_per_image"] = 700.0 + index
        for name in ("ours", "ours-workers", "ours-gateway"):
            costs = {"server": 900.0 + index, "generator": 150.0}
            if name == "ours-gateway":
                costs["gateway"] = 180.0
            measured[name]["closed"]["cpu_us_per_image"] = costs
    report = vision_report.report(runs, meta)
    section = report.split(f"## {model}")[1].split("\n## ")[0]
    assert "The raw bound spends 701 (700 / 701 / 702) per photo" in section
    server, generator = "| 901 (900 / 901 / 902) |", "| 150 (150 / 150 / 150) |"
    rows = [line for line in section.splitlines() if server in line]
    assert len(rows) == 3, section
    assert all(row.endswith(generator) for row in rows)
    assert sum("| 180 (180 / 180 / 180) |" in row for row in rows) == 1  # the gateway's own
    assert sum("| - |" in row for row in rows) == 2  # no gateway in front
    assert report.count("CPU per photo at capacity") == 1  # not for the model without numbers


def test_triton_counts_among_the_peers_once_it_ran() -> None:
    runs = [run(ours=configuration(950.0, 8.0, 2.0, 5.0, 900.0), triton={"closed": {"throughput": 1000.0}})]
    checks = {target: (measured, met) for target, measured, met in vision_report.target_checks(runs, "ours")}
    assert checks["capacity above every peer"] == ("1.90x ray, 1.06x litserve, 0.95x triton", False)
    failed = [run(ours=configuration(950.0, 8.0, 2.0, 5.0, 900.0), triton={"error": "RuntimeError: no"})]
    checks = {
        target: (measured, met) for target, measured, met in vision_report.target_checks(failed, "ours")
    }
    assert checks["capacity above every peer"] == ("1.90x ray, 1.06x litserve", True)


def test_a_run_with_the_generator_on_cpus_of_its_own_says_so() -> None:
    saved = json.loads((REPO / "docs" / "benchmarks" / "vision.json").read_text())
    assert "the load generator ran alone" not in vision_report.report(saved["runs"], saved["meta"]).lower()
    meta = {**saved["meta"], "generator_cpus": [0]}
    assert "The load generator ran alone on CPU(s) 0 (`--generator-cpus`, taskset)" in vision_report.report(
        saved["runs"], meta
    )


def test_without_peers_the_peer_target_is_not_checked_rather_than_missed() -> None:
    lonely = run(ours=configuration(950.0, 8.0, 2.0, 5.0, 900.0))
    for peer in ("ray", "litserve"):
        del lonely[peer]
    checks = vision_report.target_checks([lonely], "ours")
    assert ("capacity above every peer", "no peer ran", None) in checks
    row = next(line for line in vision_report.targets([lonely]) if "above every peer" in line)
    assert row == "| capacity above every peer | not checked: no peer ran |"


def test_the_half_load_split_is_tabled_per_layer_where_measured() -> None:
    saved = json.loads((REPO / "docs" / "benchmarks" / "vision.json").read_text())
    runs, meta = saved["runs"], saved["meta"]
    model = next(iter(runs[0]))
    for run_ in runs:  # as in reports from before the split was measured
        for measured in run_.values():
            for result in measured.values():
                if isinstance(result, dict):
                    result.get("half", {}).pop("split", None)
    for index, run_ in enumerate(runs):
        for name in ("ours", "ours-gateway"):
            layers = {"client": {"p50_ms": 8.0 + index, "p99_ms": 40.0 + index}}
            layers["server handler"] = {"p50_ms": 7.0, "p99_ms": 35.0}
            if name == "ours-gateway":
                layers["gateway call"] = {"p50_ms": 7.5, "p99_ms": 36.0}
            run_[model][name]["half"]["split"] = layers
    report = vision_report.report(runs, meta)
    assert report.count("Where the half-load latency goes") == 1  # only the model with numbers
    section = report.split(f"## {model}")[1].split("\n## ")[0]
    table = section.split("Where the half-load latency goes")[1].split("\n\n")[1].splitlines()
    assert table[0] == (
        "| server | client | gateway call | gateway own | gateway -> backend | server handler | decode "
        "| queue wait | batch compute |"
    )
    rows = {row.split(" | ")[0][2:]: row.split(" | ")[1:] for row in table[2:]}
    assert set(rows) == {vision_report.SERVERS["ours"], vision_report.SERVERS["ours-gateway"]}
    one_process = rows[vision_report.SERVERS["ours"]]
    assert one_process[:5] == ["9.0 / 41.0", "-", "-", "-", "7.0 / 35.0"]  # medians of the 3 runs
    assert rows[vision_report.SERVERS["ours-gateway"]][1] == "7.5 / 36.0"


def test_where_the_cores_went_at_3x_is_tabled_only_where_measured() -> None:
    saved = json.loads((REPO / "docs" / "benchmarks" / "vision.json").read_text())
    runs, meta = saved["runs"], saved["meta"]
    model, unmeasured = list(runs[0])[:2]
    for run_ in runs:  # as in reports from before the cores were measured
        for result in run_[unmeasured].values():
            if isinstance(result, dict):
                result.get("overload", {}).pop("cpu_cores", None)
    for index, run_ in enumerate(runs):
        for name in ("ours", "ours-workers", "ours-gateway-one", "ours-gateway"):
            result = run_[model][name]
            cores = {"server": 1.1 + index / 100, "generator": 0.5}
            if "gateway" in name:
                cores["gateway"] = 0.3
            result["overload"]["cpu_cores"] = cores
            result["closed"]["cpu_cores"] = {"server": 1.8, "generator": 0.1}
    report = vision_report.report(runs, meta)
    section = report.split(f"## {model}")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if "| 1.11 (1.10 / 1.11 / 1.12) |" in line]
    assert len(rows) == 4, section
    assert all(
        row.startswith("| SnapLearn") and row.endswith("| 1.80 (1.80 / 1.80 / 1.80) |") for row in rows
    )
    assert all("| 0.50 (0.50 / 0.50 / 0.50) |" in row for row in rows)  # the generator's
    assert sum("| 0.30 (0.30 / 0.30 / 0.30) |" in row for row in rows) == 2  # behind the gateway
    assert report.count("Where the cores went at 3x overload") == 1  # the other model has no numbers
