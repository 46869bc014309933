"""Recommender settings: the scale-out flags, their environment fallbacks and their checks."""

from __future__ import annotations

import pytest

from snaplearn_recommender.config import RecommenderSettings, settings_from_args


def test_default_role_is_standalone_without_a_snapshot_store() -> None:
    settings = settings_from_args([])
    assert (settings.role, settings.snapshot_dir) == ("standalone", None)


def test_flags_and_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_args(
        ["--role", "trainer", "--snapshot-dir", "/shared/snapshots", "--publish-interval", "2.5"]
    )
    assert (settings.role, settings.snapshot_dir, settings.publish_interval_s) == (
        "trainer",
        "/shared/snapshots",
        2.5,
    )
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_ROLE", "query")
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_SNAPSHOT_DIR", "/mnt/snapshots")
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_POLL_INTERVAL", "0.5")
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_SNAPSHOT_RETAIN", "3")
    settings = settings_from_args([])
    assert (settings.role, settings.snapshot_dir) == ("query", "/mnt/snapshots")
    assert (settings.poll_interval_s, settings.snapshot_retain) == (0.5, 3)


@pytest.mark.parametrize("role", ["trainer", "query"])
def test_trainer_and_query_need_a_snapshot_dir(role: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--role", role])
    assert f"role {role} needs a snapshot directory" in capsys.readouterr().err


def test_object_store_paths_are_refused_at_startup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--role", "query", "--snapshot-dir", "s3://bucket/snapshots"])
    assert "object stores are not yet" in capsys.readouterr().err


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        RecommenderSettings(role="leader")


def test_max_connection_age_flag_environment_and_zero_means_never(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args([]).max_connection_age_s is None
    assert settings_from_args(["--max-connection-age", "120"]).max_connection_age_s == 120.0
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_MAX_CONNECTION_AGE", "300")
    assert settings_from_args([]).max_connection_age_s == 300.0
    assert settings_from_args(["--max-connection-age", "0"]).max_connection_age_s is None
    with pytest.raises(ValueError, match="max_connection_age_s"):
        RecommenderSettings(max_connection_age_s=-1)


def test_feedback_spool_dir_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args([]).feedback_spool_dir is None
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_FEEDBACK_SPOOL_DIR", "/var/spool/feedback")
    assert str(settings_from_args([]).feedback_spool_dir) == "/var/spool/feedback"
    assert str(settings_from_args(["--feedback-spool-dir", "/x"]).feedback_spool_dir) == "/x"
