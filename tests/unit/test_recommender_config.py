"""Recommender settings: flags, their environment variables, their checks and the nested bus settings."""

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


def test_a_bad_value_names_its_flag_and_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settings_from_args(["--batch-max-events", "0"])
    assert exited.value.code == 2
    assert "--batch-max-events (env SNAPLEARN_RECOMMENDER_BATCH_MAX_EVENTS)" in capsys.readouterr().err
    monkeypatch.setenv("SNAPLEARN_RECOMMENDER_POLL_INTERVAL", "-1")
    with pytest.raises(SystemExit):
        settings_from_args([])
    assert "got '-1' from SNAPLEARN_RECOMMENDER_POLL_INTERVAL" in capsys.readouterr().err


def test_the_bus_settings_nest_and_feed_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPLEARN_BUS_PARTITIONS", "8")
    argv = ["--bus", "kafka", "--bus-topic", "school-a.events", "--consumer-group", "g"]
    settings = settings_from_args(argv)
    assert (settings.bus.backend, settings.bus.partitions) == ("kafka", 8)
    worker = settings.worker_settings()
    assert (worker.topic, worker.dead_letter_topic, worker.group_id, worker.topic_partitions) == (
        "school-a.events",
        "school-a.events.dlq",
        "g",
        8,
    )
