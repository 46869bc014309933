"""snaplearn_vision.config: the GIL switch interval, from the flag, the environment or the default."""

from __future__ import annotations

import pytest

from snaplearn_vision.config import ENV_PREFIX, VisionSettings, settings_from_args


def test_the_gil_switch_interval_comes_from_the_flag_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert settings_from_args([]).gil_switch_interval_ms == 1.0
    monkeypatch.setenv(ENV_PREFIX + "GIL_SWITCH_INTERVAL_MS", "0.25")
    assert settings_from_args([]).gil_switch_interval_ms == 0.25
    assert settings_from_args(["--gil-switch-interval-ms", "2"]).gil_switch_interval_ms == 2.0


@pytest.mark.parametrize("interval_ms", [0.0, -1.0, 0.001, 500.0, float("nan")])
def test_a_gil_switch_interval_out_of_range_is_refused_with_its_range(interval_ms: float) -> None:
    with pytest.raises(ValueError, match=r"gil_switch_interval_ms must be in 0\.01\.\.100"):
        VisionSettings(gil_switch_interval_ms=interval_ms)


def test_the_command_line_names_the_bad_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--gil-switch-interval-ms", "0"])
    assert "gil_switch_interval_ms must be in 0.01..100, got 0.0" in capsys.readouterr().err
