"""The model-format benchmark's own logic: exporting a network to every format (each file then
loads in its bare runtime and in our engine, at more than one batch size), and the report's
ratios, verdicts and page section. No server: the measured run is benchmarks/model_formats.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from snaplearn_bench import format_runtime, model_formats
from snaplearn_vision.runtime.model_repository import ModelRepository


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))


SPEC = {
    "architecture": "tiny",
    "size": [16, 16],
    "channels": 3,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "labels": ["a", "b", "c"],
    "weights": "",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], torch.nn.Module]:
    torch.manual_seed(0)
    network = Tiny().eval()
    out = tmp_path_factory.mktemp("formats")
    formats = ["torchscript", "torch_export", "onnx"]
    return format_runtime.export_network(network, torch.rand(2, 3, 16, 16), out, "tiny", formats), network


def test_export_writes_every_format_with_a_dynamic_batch(exported: tuple[dict[str, Any], nn.Module]) -> None:
    result, network = exported
    assert sorted(result["files"]) == ["onnx", "torch_export", "torchscript"]
    assert all(seconds >= 0 for seconds in result["export_s"].values())
    for batch in (1, 5):  # neither is the example's batch of 2
        pixels = torch.rand(batch, 3, 16, 16)
        with torch.no_grad():
            expected = network(pixels)
        for fmt, file in result["files"].items():
            run = format_runtime._bare_runner(fmt, file, SPEC, "cpu", "fp32", nhwc=False)
            got = torch.as_tensor(run(pixels))
            assert got.shape == (batch, 3), fmt
            assert torch.allclose(got, expected, atol=1e-4), fmt


def test_bare_bound_reports_every_batch_size_and_the_best(exported: tuple[dict[str, Any], nn.Module]) -> None:
    result, _ = exported
    bound = format_runtime.bare_bound("onnx", result["files"]["onnx"], SPEC, [1, 4], seconds=0.05)
    assert sorted(bound["by_batch_size"]) == ["1", "4"]
    assert bound["best_batch_size"] in (1, 4)
    assert bound["images_per_s"] == max(bound["by_batch_size"].values()) > 0


def test_version_folders_load_in_our_engine(
    exported: tuple[dict[str, Any], nn.Module], tmp_path: Path
) -> None:
    result, _ = exported
    for fmt, file in result["files"].items():
        name = format_runtime.served_name("tiny", fmt)
        format_runtime.write_version(tmp_path, name, file, fmt, SPEC, max_batch_size=4)
        config = json.loads((tmp_path / name / "1" / "config.json").read_text())
        assert config["format"] == fmt
        classifier = ModelRepository(tmp_path).load(name, "1", device="cpu")
        try:
            assert classifier.format == fmt
            assert tuple(classifier.labels) == ("a", "b", "c")
            classifier.warm_up(max_batch_size=4)  # every batch size up to the batcher's max
        finally:
            classifier.close()
    assert format_runtime.served_name("resnet50", "torch_export") == "resnet50-torch-export"


def test_export_refuses_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown formats \\['tflite'\\]"):
        format_runtime.export_network(Tiny().eval(), torch.rand(2, 3, 16, 16), tmp_path, "t", ["tflite"])


def _row(raw: float, served: float, p99: float = 40.0) -> dict[str, Any]:
    return {
        "export_s": 1.0,
        "raw": {"images_per_s": raw, "best_batch_size": 16, "by_batch_size": {"16": raw}},
        "ours": {
            "capacity": served,
            "mean_batch": 6.0,
            "half_rate": served / 2,
            "half_p99_ms": p99,
            "errors": {},
        },
    }


def _result() -> dict[str, Any]:
    return {
        "meta": {
            "command": "python benchmarks/model_formats.py --models resnet50",
            "machine": "x86_64, 2 CPUs visible",
            "device": "cpu",
            "precision": "fp32",
            "channels_last": True,
            "torch_threads": 1,
            "decode_threads": 2,
            "max_batch_size": 16,
            "concurrency": 32,
            "seconds": 5.0,
            "raw_seconds": 2.0,
            "reps": 1,
            "load_average_1m": 3.0,
        },
        "models": {
            "resnet50": {
                "input": "3x224x224",
                "architecture": "resnet50",
                "formats": {
                    "torchscript": _row(raw=20.0, served=19.0),
                    "onnx": _row(raw=25.0, served=23.0, p99=55.5),
                    "torch_export": {"export_s": 2.0, "failed": "RuntimeError: boom"},
                },
                "peers": {
                    "triton": {
                        "capacity": 21.0,
                        "p99_ms": 80.0,
                        "mean_batch": 7.5,
                        "half_rate": 11.5,
                        "half_p99_ms": 70.25,
                        "errors": {"DEADLINE_EXCEEDED": 2},
                        "format": "onnx",
                        "runs": model_formats.PEER_RUNS["triton"],
                    },
                    "ray": {
                        "capacity": 10.0,
                        "p99_ms": 90.0,
                        "mean_batch": 4.0,
                        "half_rate": 11.5,
                        "half_p99_ms": 300.0,
                        "errors": {},
                        "format": "onnx",
                        "runs": model_formats.PEER_RUNS["ray"],
                    },
                    "litserve": {"status": "not installed (litserve; --install-peers)"},
                },
            },
            "mobilenet_v3_large": {
                "input": "3x224x224",
                "architecture": "mobilenet_v3_large",
                "formats": {"onnx": _row(raw=100.0, served=70.0)},
            },
        },
    }


def test_summary_ratios_against_the_best_raw_bound() -> None:
    result = model_formats.summarize(_result())
    resnet = result["models"]["resnet50"]
    summary = resnet["summary"]
    assert summary["best_raw_format"] == "onnx"
    assert summary["slowest_raw_format"] == "torchscript"
    assert summary["raw_lead_over_slowest"] == pytest.approx(1.25)
    assert summary["raw_lead_over"] == {"torchscript": pytest.approx(1.25)}
    assert summary["best_served_format"] == "onnx"
    assert summary["best_served_vs_best_raw"] == pytest.approx(0.92)
    assert summary["meets_target"] is True
    assert summary["peers_measured"] == ["ray", "triton"]
    assert summary["above_every_measured_peer"] is True
    assert (summary["best_peer"], summary["best_peer_images_per_s"]) == ("triton", 21.0)
    assert summary["ours_vs_best_peer"] == pytest.approx(23.0 / 21.0)
    assert resnet["formats"]["torchscript"]["ours_vs_own_raw"] == pytest.approx(0.95)
    assert resnet["formats"]["torchscript"]["ours_vs_best_raw"] == pytest.approx(0.76)
    assert resnet["peers"]["ray"]["vs_best_raw"] == pytest.approx(0.4)
    assert resnet["peers"]["triton"]["vs_best_raw"] == pytest.approx(0.84)
    assert "ours_vs_best_raw" not in resnet["formats"]["torch_export"]  # failed: no ratio
    mobilenet = result["models"]["mobilenet_v3_large"]["summary"]
    assert mobilenet["best_served_vs_best_raw"] == pytest.approx(0.7)
    assert mobilenet["meets_target"] is False


def test_a_model_whose_every_format_failed_is_said_so() -> None:
    result = _result()
    result["models"] = {"resnet50": {"input": "3x224x224", "formats": {"onnx": {"failed": "OSError: x"}}}}
    summarized = model_formats.summarize(result)
    assert summarized["models"]["resnet50"]["summary"] == {"measured": False}
    assert model_formats.verdicts(summarized) == ["resnet50: not measured (every format failed)."]
    assert "| resnet50 (3x224x224) | ours, onnx | failed: OSError: x |" in model_formats.markdown_table(
        summarized
    )


def test_table_and_verdicts_name_formats_peers_and_target() -> None:
    result = model_formats.summarize(_result())
    table = model_formats.markdown_table(result).splitlines()
    assert table[0].startswith("| model | served as | raw bound img/s (batch) | capacity img/s | mean batch")
    assert all(line.count("|") == table[0].count("|") for line in table), "every row has every column"
    assert (
        "| resnet50 (3x224x224) | ours, onnx | 25.0 (16) | 23.0 | 6.0 | 92% | 92% | 11.5 | 55.5 | 0 |"
        in table
    )
    assert (
        "| resnet50 (3x224x224) | ours, torchscript | 20.0 (16) | 19.0 | 6.0 | 95% | 76% | 9.5 | 40.0 | 0 |"
        in table
    )
    assert "| resnet50 (3x224x224) | ours, torch_export | failed: RuntimeError: boom | | | | | | | |" in table
    # A peer's row: the format it served, its batches, its share of the bound, and its p99 at
    # our half-load rate (the same offered load as ours).
    assert (
        "| resnet50 (3x224x224) | triton, onnx | | 21.0 | 7.5 | | 84% | 11.5 | 70.2 | DEADLINE_EXCEEDED 2 |"
        in table
    )
    assert "| resnet50 (3x224x224) | ray, onnx | | 10.0 | 4.0 | | 40% | 11.5 | 300.0 | 0 |" in table
    assert (
        "| resnet50 (3x224x224) | litserve | not installed (litserve; --install-peers) | | | | | | | |"
        in table
    )
    verdicts = model_formats.verdicts(result)
    assert verdicts[0] == (
        "resnet50: fastest bare runtime **onnx** (25.0 img/s; 1.25x torchscript); best served **onnx** at "
        "92% of that bound (target >= 90%: met; above every measured peer (ray, triton); the fastest, "
        "triton, 21.0 img/s: ours 1.10x)."
    )
    assert verdicts[1].startswith(
        "mobilenet_v3_large: fastest bare runtime **onnx** (100.0 img/s; the only format measured)"
    )


def test_the_fastest_format_is_given_its_lead_over_each_other_format() -> None:
    result = _result()
    formats = result["models"]["resnet50"]["formats"]
    formats["torch_export"] = _row(raw=10.0, served=9.0)
    summary = model_formats.summarize(result)["models"]["resnet50"]["summary"]
    assert list(summary["raw_lead_over"]) == ["torchscript", "torch_export"]  # fastest first
    assert summary["raw_lead_over"]["torch_export"] == pytest.approx(2.5)
    verdict = model_formats.verdicts(model_formats.summarize(result))[0]
    assert verdict.startswith(
        "resnet50: fastest bare runtime **onnx** (25.0 img/s; 1.25x torchscript, 2.50x torch_export)"
    )


def test_a_multi_line_failure_stays_one_table_cell() -> None:
    result = _result()
    traceback = (
        "RuntimeError: server failed\n  File x.py | line 3\n" + "y" * 300 + "\nAttributeError: no user_ids"
    )
    result["models"]["resnet50"]["formats"]["torch_export"]["failed"] = traceback
    table = model_formats.markdown_table(model_formats.summarize(result)).splitlines()
    row = next(line for line in table if "ours, torch_export" in line)
    assert row.endswith("AttributeError: no user_ids | | | | | | | |")
    assert row.count("|") == table[0].count("|") and "| failed: ..." in row


def test_a_median_batch_size_is_printed_as_a_whole_number() -> None:
    result = _result()
    result["models"]["resnet50"]["formats"]["onnx"]["raw"]["best_batch_size"] = 8.0  # median of reps
    table = model_formats.markdown_table(model_formats.summarize(result))
    assert "| ours, onnx | 25.0 (8) |" in table


def test_a_peer_above_us_is_said_so() -> None:
    result = _result()
    result["models"]["resnet50"]["peers"]["triton"]["capacity"] = 24.0  # ours: 23.0
    verdict = model_formats.verdicts(model_formats.summarize(result))[0]
    assert verdict.endswith(
        "(target >= 90%: met; NOT above every measured peer (ray, triton); the fastest, triton, "
        "24.0 img/s: ours 0.96x)."
    )


def test_peers_on_another_model_are_compared_without_the_target() -> None:
    result = _result()
    mobilenet = result["models"]["mobilenet_v3_large"]
    mobilenet["peers"] = {"litserve": {"capacity": 50.0, "format": "onnx", "runs": "x", "errors": {}}}
    verdict = model_formats.verdicts(model_formats.summarize(result))[1]
    assert verdict.endswith(
        "at 70% of that bound (above every measured peer (litserve); the fastest, litserve, 50.0 img/s: "
        "ours 1.40x)."
    )
    assert "target" not in verdict


def test_the_peers_serve_the_fastest_bare_format_unless_told() -> None:
    entry = _result()["models"]["resnet50"]
    assert model_formats.peer_format(entry, "best") == "onnx"  # 25.0 vs 20.0; torch_export failed
    assert model_formats.peer_format(entry, "torchscript") == "torchscript"
    assert model_formats.peer_format({"formats": {"onnx": {"failed": "x"}}}, "best") is None


def test_peer_notes_say_what_each_peer_ran_once() -> None:
    notes = model_formats.peer_notes(model_formats.summarize(_result()))
    assert notes == [
        f"triton: {model_formats.PEER_RUNS['triton']}, on the onnx version folder",
        f"ray: {model_formats.PEER_RUNS['ray']}, on the onnx version folder",
    ]
    assert "Python callable runs our engine" in notes[0]


def test_section_replaces_only_its_own_block() -> None:
    result = model_formats.summarize(_result())
    block = model_formats.section(result)
    assert block.startswith(model_formats.BEGIN) and block.endswith(model_formats.END)
    assert "load average 3.0 at the start." in block
    assert (
        f"- ray: {model_formats.PEER_RUNS['ray']}, on the onnx version folder\n\nA peer's half-load" in block
    )
    assert block.endswith(f"queues, and its p99 says so.\n{model_formats.END}")
    ended = model_formats.summarize(_result())
    ended["meta"]["load_average_1m_end"] = 1.5
    assert "load average 3.0 at the start, 1.5 at the end." in model_formats.section(ended)
    page = f"# Models\n\nswap text\n\n{model_formats.BEGIN}\nold table\n{model_formats.END}\n\nafter\n"
    written = model_formats.write_section(page, block)
    assert "old table" not in written
    assert written.startswith("# Models\n\nswap text\n\n") and written.endswith("\n\nafter\n")
    assert model_formats.write_section("# Models\n", block) == f"# Models\n\n{block}\n"


def test_median_of_repetitions() -> None:
    reps = [
        {"capacity": 10.0, "half_p99_ms": 50.0, "errors": {"UNAVAILABLE": 1}, "note": "a"},
        {"capacity": 14.0, "half_p99_ms": 30.0, "errors": {}, "note": "a"},
        {"capacity": 12.0, "half_p99_ms": 70.0, "errors": {"UNAVAILABLE": 2}, "note": "a"},
    ]
    merged = model_formats.median_of(reps)
    assert merged["capacity"] == 12.0 and merged["half_p99_ms"] == 50.0
    assert merged["errors"] == {"UNAVAILABLE": 3}
    assert merged["reps"] == reps
    assert model_formats.median_of(reps[:1]) == reps[0]
    assert math.isnan(model_formats._ratio(1.0, 0.0))


def test_quick_flags_parse() -> None:
    args = model_formats.build_parser().parse_args(
        ["--models", "resnet50", "--formats", "onnx", "--reps", "2"]
    )
    assert (args.models, args.formats, args.reps, args.torch_threads, args.device) == (
        "resnet50",
        "onnx",
        2,
        1,
        "cpu",
    )
    assert (args.peer_models, args.peer_format) == ("resnet50", "best")
    assert model_formats.parse_list(" a, ,b ") == ["a", "b"]


class DataDependent(Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if bool(logits.sum() > 0) else -logits  # torch.export cannot capture this


def test_a_format_that_fails_to_export_leaves_the_others(tmp_path: Path) -> None:
    result = format_runtime.export_network(
        DataDependent().eval(), torch.rand(2, 3, 16, 16), tmp_path, "dd", ["torch_export", "onnx"]
    )
    assert sorted(result["files"]) == ["onnx"]
    assert Path(result["files"]["onnx"]).exists()
    assert result["failed"]["torch_export"].startswith("export: ")


def test_load_windows_hold_enough_batches_within_bounds() -> None:
    args = model_formats.build_parser().parse_args(["--seconds", "5", "--max-batch-size", "8"])
    assert args.min_batches == 30
    assert model_formats.window_s(args, 16.0) == 15.0  # 30 x 8 / 16 = 15 s
    assert model_formats.window_s(args, 8.0) == 15.0  # 30 s wanted, capped at 3 x 5 s
    assert model_formats.window_s(args, 40.0) == 6.0
    assert model_formats.window_s(args, 3000.0) == 5.0  # never below --seconds
    assert model_formats.window_s(args, float("nan")) == 5.0
    off = model_formats.build_parser().parse_args(["--seconds", "5", "--min-batches", "0"])
    assert model_formats.window_s(off, 16.0) == 5.0


def test_reps_apply_to_the_chosen_models_and_the_page_says_so() -> None:
    args = model_formats.build_parser().parse_args(["--reps", "3", "--reps-models", "resnet50"])
    assert (model_formats.reps_for(args, "resnet50"), model_formats.reps_for(args, "worksheet-topics")) == (
        3,
        1,
    )
    every = model_formats.build_parser().parse_args(["--reps", "2"])
    assert model_formats.reps_for(every, "worksheet-topics") == 2
    result = model_formats.summarize(_result())
    result["meta"]["min_batches"] = 30
    result["models"]["resnet50"]["reps"] = 3
    result["models"]["mobilenet_v3_large"]["reps"] = 1
    result["models"]["resnet50"]["formats"]["onnx"]["window_s"] = 12.5
    result["models"]["resnet50"]["formats"]["torchscript"]["window_s"] = 15.0
    result["models"]["mobilenet_v3_large"]["formats"]["onnx"]["window_s"] = 5.0
    block = model_formats.section(result)
    assert "5.0 s per load window (stretched to hold 30 full batches: resnet50 12.5-15.0 s)" in block
    assert "reps (median): resnet50 3, mobilenet_v3_large 1;" in block
