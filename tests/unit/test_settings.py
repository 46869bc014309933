"""snaplearn_common.settings: one declaration gives flags, environment variables and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

import pytest
from pydantic import Field, SecretStr

from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.settings import Cli, InvalidSettings, Settings, SettingsConfigDict, none_for


class DemoSettings(Settings):
    """A demo server.

    This paragraph is not part of --help's description.
    """

    model_config = SettingsConfigDict(env_prefix="SNAPLEARN_DEMO_")
    cli_prog: ClassVar[str | None] = "snaplearn-demo"

    port: Annotated[int, Field(ge=0, le=65535, description="gRPC port (0 picks one)")] = 50051
    max_queue_size: Annotated[int, Field(ge=1, description="requests waiting at most")] = 64
    shutdown_grace_s: Annotated[float, Cli(flag="--shutdown-grace", group="operations")] = 10.0
    compile_model: Annotated[bool, Cli(flag="--compile")] = False
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ready_file: Path | None = None
    max_batch_size: Annotated[int | None, none_for("", "model")] = None
    checkpoint_interval_s: float = Field(default=30.0, validation_alias="SNAPLEARN_DEMO_CHECKPOINT_INTERVAL")
    token: Annotated[SecretStr | None, Cli(env_only=True)] = None
    worker_index: Annotated[int | None, Cli(hidden=True)] = None
    bus: BusSettings = Field(default_factory=BusSettings)


def test_flag_beats_environment_beats_default() -> None:
    environ = {"SNAPLEARN_DEMO_PORT": "7000", "SNAPLEARN_DEMO_MAX_QUEUE_SIZE": "9", "SNAPLEARN_BUS": "kafka"}
    settings = DemoSettings.from_argv(["--port", "8000", "--bus", "embedded"], environ=environ)
    assert settings.port == 8000  # flag over environment
    assert settings.max_queue_size == 9  # environment over default
    assert settings.shutdown_grace_s == 10.0  # default
    assert settings.bus.backend == "embedded"  # nested flag over its environment variable
    assert DemoSettings.from_argv([], environ=environ).bus.backend == "kafka"
    assert DemoSettings.from_argv([], environ={}) == DemoSettings.from_env({})


def test_values_in_code_beat_the_environment_and_flags_convert_types() -> None:
    environ = {"SNAPLEARN_DEMO_PORT": "7000", "SNAPLEARN_DEMO_CHECKPOINT_INTERVAL": "5"}
    settings = DemoSettings.from_env(environ, port=1, bus=BusSettings.from_env({}, partitions=2))
    assert (settings.port, settings.checkpoint_interval_s, settings.bus.partitions) == (1, 5.0, 2)
    parsed = DemoSettings.from_argv(
        [
            "--compile",
            "--no-channels-last",
            "--ready-file",
            "/tmp/ready.json",
            "--max-batch-size",
            "model",
            "--worker-index",
            "3",
            "--checkpoint-interval-s",
            "2.5",
        ],
        environ={},
    )
    assert (parsed.compile_model, parsed.channels_last) == (True, False)
    assert parsed.ready_file == Path("/tmp/ready.json")
    assert parsed.max_batch_size is None
    assert parsed.worker_index == 3
    assert parsed.checkpoint_interval_s == 2.5


def test_booleans_from_the_environment() -> None:
    assert DemoSettings.from_env({"SNAPLEARN_DEMO_CHANNELS_LAST": "0"}).channels_last is False
    assert DemoSettings.from_env({"SNAPLEARN_DEMO_COMPILE_MODEL": "true"}).compile_model is True
    flags_win = DemoSettings.from_argv(["--no-compile"], environ={"SNAPLEARN_DEMO_COMPILE_MODEL": "1"})
    assert flags_win.compile_model is False


def test_a_bad_flag_exits_2_naming_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        DemoSettings.from_argv(["--max-queue-size", "0"], environ={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: snaplearn-demo")
    assert (
        "snaplearn-demo: error: --max-queue-size (env SNAPLEARN_DEMO_MAX_QUEUE_SIZE): "
        "input should be greater than or equal to 1, got '0' from --max-queue-size"
    ) in err


def test_a_bad_environment_variable_is_named_with_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        DemoSettings.from_argv(
            [], environ={"SNAPLEARN_BUS_PARTITIONS": "many", "SNAPLEARN_DEMO_DEVICE": "tpu"}
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "--bus-partitions (env SNAPLEARN_BUS_PARTITIONS): input should be a valid integer, "
        "unable to parse string as an integer, got 'many' from SNAPLEARN_BUS_PARTITIONS"
    ) in err
    assert "--device (env SNAPLEARN_DEMO_DEVICE): input should be 'auto', 'cpu' or 'cuda', got 'tpu'" in err


def test_invalid_values_in_code_raise_invalid_settings() -> None:
    with pytest.raises(InvalidSettings, match=r"--port \(env SNAPLEARN_DEMO_PORT\): input should be less"):
        DemoSettings.from_env({}, port=70000)
    with pytest.raises(InvalidSettings, match="unknown setting 'prot'"):
        DemoSettings.from_env({}, prot=1)
    with pytest.raises(ValueError):  # direct construction validates too
        BusSettings(partitions=0)


def test_secrets_are_environment_only_and_never_in_repr(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"SNAPLEARN_DEMO_TOKEN": "s3cret", "SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD": "hunter2"}
    settings = DemoSettings.from_env(environ)
    assert settings.token is not None and settings.token.get_secret_value() == "s3cret"
    assert settings.bus.kafka_security == {"sasl_plain_password": "hunter2"}
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "s3cret" not in text and "hunter2" not in text
    with pytest.raises(SystemExit):
        DemoSettings.from_argv(["--token", "s3cret"], environ={})
    assert "unrecognized arguments: --token" in capsys.readouterr().err


def test_help_lists_every_flag_with_its_variable_and_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag, so that each phrase can be matched whole
    with pytest.raises(SystemExit) as exit_info:
        DemoSettings.from_argv(["--help"], environ={})
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: snaplearn-demo")
    assert "A demo server." in text and "not part of --help" not in text
    assert "--port PORT gRPC port (0 picks one) (env SNAPLEARN_DEMO_PORT; default 50051)" in text
    assert "--compile, --no-compile (env SNAPLEARN_DEMO_COMPILE_MODEL; default --no-compile)" in text
    assert (
        "--channels-last, --no-channels-last (env SNAPLEARN_DEMO_CHANNELS_LAST; default --channels-last)"
        in text
    )
    assert "--device {auto,cpu,cuda}" in text
    assert "--ready-file READY_FILE (env SNAPLEARN_DEMO_READY_FILE; default unset)" in text
    assert "(env SNAPLEARN_DEMO_CHECKPOINT_INTERVAL; default 30.0)" in text
    assert (
        "operations: --shutdown-grace SHUTDOWN_GRACE (env SNAPLEARN_DEMO_SHUTDOWN_GRACE_S; default 10.0)"
        in text
    )
    assert "--worker-index" not in text  # hidden
    assert "event bus: --bus {embedded,kafka} event bus backend (env SNAPLEARN_BUS; default embedded)" in text
    for flag, env in [
        ("--bus-path PATH", "SNAPLEARN_BUS_PATH"),
        ("--kafka-bootstrap HOSTS", "SNAPLEARN_KAFKA_BOOTSTRAP"),
        ("--bus-partitions N", "SNAPLEARN_BUS_PARTITIONS"),
        ("--bus-topic NAME", "SNAPLEARN_BUS_TOPIC"),
        ("--bus-session-timeout S", "SNAPLEARN_BUS_SESSION_TIMEOUT"),
    ]:
        assert flag in text and f"env {env};" in text
    assert "Read from the environment only: SNAPLEARN_DEMO_TOKEN, SNAPLEARN_KAFKA_SECURITY_PROTOCOL" in text
    assert "SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD" in text


def test_bus_settings_keep_todays_names_under_any_prefix() -> None:
    class LauncherSettings(Settings):
        # The bare prefix: the nested bus field must not be read from SNAPLEARN_BUS itself.
        model_config = SettingsConfigDict(env_prefix="SNAPLEARN_")
        bus: BusSettings = Field(default_factory=BusSettings)

    environ = {
        "SNAPLEARN_BUS": "kafka",
        "SNAPLEARN_BUS_PATH": "/tmp/b.db",
        "SNAPLEARN_KAFKA_BOOTSTRAP": "broker:9092",
        "SNAPLEARN_BUS_PARTITIONS": "8",
        "SNAPLEARN_BUS_TOPIC": "t",
        "SNAPLEARN_BUS_SESSION_TIMEOUT": "7",
        "SNAPLEARN_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SNAPLEARN_KAFKA_SSL_CAFILE": "",  # empty counts as unset
    }
    bus = LauncherSettings.from_env(environ).bus
    assert (bus.backend, bus.embedded_path, bus.kafka_bootstrap_servers) == (
        "kafka",
        "/tmp/b.db",
        "broker:9092",
    )
    assert (bus.partitions, bus.topic, bus.session_timeout_s) == (8, "t", 7.0)
    assert bus.kafka_security == {"security_protocol": "SASL_SSL"}
    assert BusSettings.flag_of("backend") == "--bus" and BusSettings.env_of("backend") == "SNAPLEARN_BUS"
    assert DemoSettings.env_of("bus.session_timeout_s") == "SNAPLEARN_BUS_SESSION_TIMEOUT"
    assert BusSettings.from_env({}) == BusSettings.from_env({"SNAPLEARN_BUS": ""})


def test_the_environment_given_is_the_only_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPLEARN_DEMO_PORT", "1234")
    monkeypatch.setenv("SNAPLEARN_BUS", "kafka")
    assert DemoSettings.from_env({}).port == 50051
    assert DemoSettings.from_env({}).bus.backend == "embedded"
    from_process = DemoSettings.from_argv([])  # environ None: os.environ
    assert (from_process.port, from_process.bus.backend) == (1234, "kafka")


def test_each_field_reads_only_the_variable_help_names() -> None:
    assert DemoSettings.env_names()[:3] == [
        "SNAPLEARN_DEMO_PORT",
        "SNAPLEARN_DEMO_MAX_QUEUE_SIZE",
        "SNAPLEARN_DEMO_SHUTDOWN_GRACE_S",
    ]
    assert "SNAPLEARN_DEMO_CHECKPOINT_INTERVAL" in DemoSettings.env_names()
    assert {"SNAPLEARN_BUS", "SNAPLEARN_BUS_PATH", "SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD"} <= set(
        DemoSettings.env_names()
    )
    # An aliased field is not also read under <prefix><FIELD_NAME>.
    undocumented = {
        "SNAPLEARN_DEMO_CHECKPOINT_INTERVAL_S": "5",
        "SNAPLEARN_EMBEDDED_PATH": "/tmp/other.db",
        "SNAPLEARN_BACKEND": "kafka",
        "SNAPLEARN_BUS_EMBEDDED_PATH": "/tmp/other.db",
    }
    settings = DemoSettings.from_env(undocumented)
    assert settings.checkpoint_interval_s == 30.0
    assert (settings.bus.backend, settings.bus.embedded_path) == ("embedded", "var/bus.db")
