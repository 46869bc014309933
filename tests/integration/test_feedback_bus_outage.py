"""A query replica's feedback channel opens while the Kafka cluster is unreachable (a pod must not
crash-loop while Kafka restarts): topic creation is left to the trainer, feedback waits in the
spool, and the channel says so once."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_recommender.feedback import FeedbackChannel
from snaplearn_recommender.snapshot import Snapshot


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens on it once closed


def test_channel_opens_while_the_bus_is_unreachable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("kafka", reason="kafka-python (the kafka extra) is not installed")
    bus = open_bus(
        BusSettings.from_env({}, backend="kafka", kafka_bootstrap_servers=f"127.0.0.1:{_closed_port()}")
    )

    def no_snapshot() -> Snapshot:
        raise AssertionError("opening the channel reads no snapshot")

    caplog.set_level(logging.WARNING, logger="snaplearn_recommender.feedback")
    started = time.monotonic()
    channel = FeedbackChannel.open(bus, no_snapshot, "snaplearn.events", 4, spool_dir=tmp_path / "spool")
    try:
        opened_s = time.monotonic() - started
        warnings = [r.getMessage() for r in caplog.records if r.name == "snaplearn_recommender.feedback"]
        assert warnings == [
            "event bus unreachable: topic snaplearn.events is created once it is back; feedback is spooled"
        ]
        assert opened_s < 60, f"opening took {opened_s:.0f} s"
    finally:
        channel.close(timeout_s=1.0)
        bus.close()
