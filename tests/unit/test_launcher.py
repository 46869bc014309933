"""`snaplearn up`'s settings: its flags, and the bus settings it hands both servers as flags."""

from __future__ import annotations

from pathlib import Path

from snaplearn_common.launcher import LaunchSettings


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
