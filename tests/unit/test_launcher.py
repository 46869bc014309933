"""`snaplearn up`'s settings: its flags, and the bus settings it hands both servers as flags."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from snaplearn_common.launcher import LaunchSettings, demo_command, server_processes, up


def flag_values(flags: list[str]) -> dict[str, str]:
    assert len(flags) % 2 == 0 and all(flag.startswith("--") for flag in flags[::2])
    return dict(zip(flags[::2], flags[1::2], strict=True))


def test_the_embedded_bus_lives_in_the_data_folder_unless_a_path_is_given(tmp_path: Path) -> None:
    settings = LaunchSettings.from_argv(["--data-dir", str(tmp_path)], environ={})
    assert flag_values(settings.bus_flags())["--bus-path"] == str(tmp_path / "bus.db")
    assert flag_values(settings.bus_flags())["--bus"] == "embedded"
    given = LaunchSettings.from_argv(["--data-dir", str(tmp_path), "--bus-path", "/x/bus.db"], environ={})
    assert flag_values(given.bus_flags())["--bus-path"] == "/x/bus.db"
    from_env = LaunchSettings.from_argv(
        ["--data-dir", str(tmp_path)], environ={"SNAPLEARN_BUS_PATH": "/y.db"}
    )
    assert flag_values(from_env.bus_flags())["--bus-path"] == "/y.db"


def test_kafka_settings_reach_both_servers_as_flags_and_secrets_do_not() -> None:
    settings = LaunchSettings.from_argv(
        ["--bus", "kafka", "--kafka-bootstrap", "b1:9092,b2:9092", "--bus-partitions", "8"],
        environ={"SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD": "hunter2", "SNAPLEARN_DATA_DIR": "/srv/snaplearn"},
    )
    assert settings.data_dir == Path("/srv/snaplearn")
    flags = flag_values(settings.bus_flags())
    assert (flags["--bus"], flags["--kafka-bootstrap"], flags["--bus-partitions"]) == (
        "kafka",
        "b1:9092,b2:9092",
        "8",
    )
    assert "hunter2" not in " ".join(settings.bus_flags())


# -- defects found from outside (issue 21) ----------------------------------------------------


def _argv_of(settings: LaunchSettings) -> tuple[list[str], list[str]]:
    vision, recommender = server_processes(settings)
    return vision.argv, recommender.argv


def test_server_flags_go_to_their_own_server_only_and_keep_the_launchers_bus_defaults(tmp_path: Path) -> None:
    # Was: extra flags went to both servers (the vision server died on --catalog), and the
    # launcher's own bus defaults were dropped.
    settings = LaunchSettings.from_argv(
        [
            "--data-dir", str(tmp_path),
            "--recommender-args", "--catalog 'my catalog.csv' --bus-partitions 4",
            "--vision-args", "--max-batch-size 16",
        ],
        environ={},
    )  # fmt: skip
    vision, recommender = _argv_of(settings)
    assert "--catalog" not in vision and "--max-batch-size" not in recommender
    assert recommender[recommender.index("--catalog") + 1] == "my catalog.csv"
    assert vision[vision.index("--max-batch-size") + 1] == "16"
    for argv in (vision, recommender):
        assert argv[argv.index("--bus-path") + 1] == str(tmp_path / "bus.db")
        assert argv[argv.index("--bus") + 1] == "embedded"
    # The forwarded flag comes last, so it overrides the launcher's value for that flag only.
    last = len(recommender) - 1 - recommender[::-1].index("--bus-partitions")
    assert recommender[last + 1] == "4"


def test_a_label_map_reaches_the_recommender_and_the_demo(tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    settings = LaunchSettings.from_argv(["--data-dir", str(tmp_path), "--label-map", str(labels)], environ={})
    vision, recommender = _argv_of(settings)
    assert recommender[recommender.index("--label-map") + 1] == str(labels) and "--label-map" not in vision
    demo = demo_command(settings, "v:1", "r:2", tmp_path / "photos")
    assert demo[demo.index("--label-map") + 1] == str(labels)
    assert "--label-map" not in demo_command(LaunchSettings.from_argv([], environ={}), "v:1", "r:2", tmp_path)


def test_a_busy_port_is_named_with_its_flag_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        settings = LaunchSettings.from_argv(
            ["--data-dir", str(tmp_path / "data"), "--recommender-port", str(busy), "--vision-port", "0",
             "--vision-metrics-port", "0", "--recommender-metrics-port", "0"],
            environ={},
        )  # fmt: skip
        assert up(settings) == 1  # before training a model or starting anything
    err = capsys.readouterr().err
    assert f"port {busy} on 127.0.0.1 (recommender gRPC) is in use" in err
    assert "--recommender-port" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()


def test_unbalanced_quotes_in_forwarded_flags_are_said_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = LaunchSettings.from_argv(
        ["--data-dir", str(tmp_path), "--vision-args", "--model-repository 'unclosed", *ZERO_PORTS],
        environ={},
    )
    assert up(settings) == 1
    assert "--vision-args: No closing quotation" in capsys.readouterr().err


ZERO_PORTS = ["--vision-port", "0", "--vision-metrics-port", "0", "--recommender-port", "0",
              "--recommender-metrics-port", "0"]  # fmt: skip
