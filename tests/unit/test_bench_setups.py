"""The vision scenarios' setups: the load generator alone on its CPUs and every other process
the benchmark starts on the rest (real affinities, read back from the kernel), the order of
interleaved repetitions, the server configurations an experiment measures, the Go commands
found in either layout of a checkout, and an A/B's pairing of each repetition with its baseline."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snaplearn_bench import load, ours, processes, report, vision_ab

PRINT_CPUS = "import os; print(sorted(os.sched_getaffinity(0)))"


def cpus_of(prefix: list[str]) -> str:
    return subprocess.run(
        [*prefix, sys.executable, "-c", PRINT_CPUS], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_generator_runs_on_its_cpus_and_everything_else_on_the_others() -> None:
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip(f"needs 2 or more CPUs to split; this process may run on {sorted(allowed)} only")
    generator_cpu = min(allowed)
    with load.load_generator("python", cpus=frozenset({generator_cpu})):
        command = load.current_command()
        assert command[:3] == ["taskset", "-c", str(generator_cpu)]
        assert command[3:] == [sys.executable, "-m", "snaplearn_bench.pyloadgen"]
        assert cpus_of(command[:3]) == str([generator_cpu])  # the generator, alone
        assert cpus_of([]) == str(sorted(allowed - {generator_cpu}))  # a server started now
    assert os.sched_getaffinity(0) == allowed  # restored after the block
    assert load.current_command()[0] != "taskset"


def test_generator_cpus_that_leave_none_for_the_servers_are_refused() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    refused = pytest.raises(SystemExit, match="leave at least one for the servers")
    with refused, load.load_generator("python", cpus=allowed):
        pass
    assert os.sched_getaffinity(0) == allowed


def test_experiments_alternate_their_order_between_repetitions() -> None:
    # a, b, c then c, b, a: drift in the machine's load hits every item alike.
    assert [report.alternating(["a", "b", "c"], rep) for rep in range(3)] == [
        ["a", "b", "c"],
        ["c", "b", "a"],
        ["a", "b", "c"],
    ]


def experiment_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ours.add_server_arguments(parser, seconds=8.0, max_batch_size=None)
    return parser.parse_args(list(argv))


def test_experiment_setups_are_one_process_then_the_workers_with_their_decode_threads() -> None:
    args = experiment_args("--workers", "3", "--decode-threads", "4", "--worker-decode-threads", "2")
    experiment = ours.experiment_setups(args, gateway_hint=None)
    settings, per_worker = experiment.settings, experiment.per_worker
    assert (settings.workers, settings.decode_threads, settings.gateway) == (3, 4, None)
    assert (settings.peers, settings.perf_analyzer, settings.perf_env) == (False, None, {})
    assert per_worker == dataclasses.replace(settings, decode_threads=2)
    assert experiment.servers() == {
        "1 process": (settings, []),
        "3 workers": (per_worker, ["--workers", "3"]),
    }
    assert (experiment.workers_name, experiment.workers) == ("3 workers", (per_worker, ["--workers", "3"]))


def test_experiment_setups_without_workers_are_one_process() -> None:
    experiment = ours.experiment_setups(experiment_args("--workers", "1"), gateway_hint=None)
    assert list(experiment.servers()) == ["1 process"]
    # vision_ab still measures "--workers 1" behind the gateway: the name and flags exist.
    assert experiment.workers_name == "1 workers"
    assert experiment.workers == (experiment.per_worker, ["--workers", "1"])


def test_experiment_setups_build_the_gateway_with_the_way_around_a_failed_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[tuple[str, str]] = []

    def gateway_binary(flag: str, way_around: str) -> Path:
        built.append((flag, way_around))
        return Path("/bin/snaplearn-gateway")

    monkeypatch.setattr(ours, "gateway_binary", gateway_binary)
    experiment = ours.experiment_setups(experiment_args("--workers", "2"), "or pass --no-gateway", 32)
    assert built == [("--gateway", "or pass --no-gateway")]
    for settings in (experiment.settings, experiment.per_worker):
        assert (settings.gateway, settings.gateway_max_in_flight) == (Path("/bin/snaplearn-gateway"), 32)


def test_the_go_commands_are_found_in_this_checkout_and_in_one_from_before_their_move(tmp_path: Path) -> None:
    assert processes.go_module("snaplearn-gateway") == (processes.REPO / "services" / "gateway", ".")
    assert processes.go_module("snaplearn-loadgen") == (processes.REPO / "benchmarks" / "loadgen", ".")
    # Before issue 18 both were packages of the Go client's module (an A/B's baseline may be).
    old = tmp_path / "clients" / "go"
    (old / "cmd" / "snaplearn-gateway").mkdir(parents=True)
    (old / "go.mod").write_text("module github.com/snaplearn/snaplearn/clients/go\n")
    (old / "cmd" / "snaplearn-gateway" / "main.go").write_text("package main\n")
    assert processes.go_module("snaplearn-gateway", tmp_path) == (old, "./cmd/snaplearn-gateway")
    with pytest.raises(LookupError, match="snaplearn-loadgen is not in"):
        processes.go_module("snaplearn-loadgen", tmp_path)
    with pytest.raises(SystemExit, match=r"--load-generator go: snaplearn-loadgen is not in .*; or else"):
        processes.go_command("snaplearn-loadgen", "--load-generator go", "or else", tmp_path)


def test_an_ab_compares_each_repetition_with_its_own_baseline() -> None:
    base, cand = "baseline (main)", "candidate"
    rows = {
        ("m", "1 process", base): [{"capacity": 1000.0}, {"capacity": 1500.0}, {"capacity": 0.0}],
        ("m", "1 process", cand): [{"capacity": 1100.0}, {"capacity": 1200.0}, {"capacity": 9.0}],
        ("m", "gw", cand): [{"capacity": 5.0}],  # its baseline is missing: no ratio
    }
    ratios = vision_ab.paired_ratios(rows, base, "capacity")
    # Repetition by repetition; a baseline of 0 (nothing measured) gives no ratio.
    assert ratios == {("m", "1 process"): [pytest.approx(1.1), pytest.approx(0.8)], ("m", "gw"): []}


def test_each_side_of_an_ab_runs_behind_the_gateway_built_from_its_own_checkout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def gateway_binary(flag: str, way_around: str, checkout: Path) -> Path:
        assert (flag, way_around) == ("--gateway", "or pass --no-gateway")
        return checkout / "services" / "gateway" / "bin" / "snaplearn-gateway"

    monkeypatch.setattr(vision_ab, "gateway_binary", gateway_binary)
    codes = {"baseline (main)": Path("/runs/ab-1234"), "candidate": Path("/repo")}
    assert vision_ab.own_gateways(codes) == {
        "baseline (main)": Path("/runs/ab-1234/services/gateway/bin/snaplearn-gateway"),
        "candidate": Path("/repo/services/gateway/bin/snaplearn-gateway"),
    }


def test_a_checkouts_own_packages_come_first_for_its_servers(tmp_path: Path) -> None:
    env = processes.torch_env(1, tmp_path)
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert env["OMP_NUM_THREADS"] == "1"
    assert paths[:2] == [str(tmp_path / "protos" / "python"), str(tmp_path / "services")]
    assert paths[-1] == str(processes.BENCH_DIR)  # the harness, for the processes it starts
