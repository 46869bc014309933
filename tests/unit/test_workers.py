"""The worker supervisor's pieces that need no model: the port reservation, restart backoff,
spool folders, the command each worker runs, and the settings."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from snaplearn_vision import config as vision_config
from snaplearn_vision.process.supervisor import (
    RESTART_BACKOFF_S,
    Worker,
    WorkerSupervisor,
    reserve_port,
    restart_backoff_s,
    worker_spool_dir,
)


def reuseport_listener(port: int) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    return listener


def test_the_reserved_port_takes_no_connections_but_admits_reuseport_listeners() -> None:
    holder = reserve_port("127.0.0.1", 0)
    port = holder.getsockname()[1]
    try:
        assert port > 0
        with pytest.raises(ConnectionRefusedError):  # held, but nobody listens yet
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with socket.socket() as intruder, pytest.raises(OSError) as refused:
            intruder.bind(("127.0.0.1", port))  # a program without SO_REUSEPORT cannot take it
        assert refused.value.errno == errno.EADDRINUSE
        with reuseport_listener(port) as worker:  # a worker joins the port
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            accepted, _ = worker.accept()
            accepted.close()
            client.close()
    finally:
        holder.close()


def test_a_port_taken_without_reuseport_cannot_be_reserved() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError) as refused:
            reserve_port("127.0.0.1", taken.getsockname()[1])
    assert refused.value.errno == errno.EADDRINUSE


def test_restart_backoff_grows_with_quick_deaths_and_is_capped() -> None:
    assert restart_backoff_s(0) == 0.0  # it had been up for a while: restart at once
    assert [restart_backoff_s(n) for n in range(1, len(RESTART_BACKOFF_S) + 1)] == list(RESTART_BACKOFF_S)
    assert restart_backoff_s(100) == RESTART_BACKOFF_S[-1]


def test_worker_0_keeps_the_spool_and_the_others_get_subfolders() -> None:
    assert worker_spool_dir(Path("var/spool"), 0) == Path("var/spool")
    assert worker_spool_dir(Path("var/spool"), 2) == Path("var/spool/worker-2")
    assert worker_spool_dir(None, 1) is None


def test_each_worker_repeats_the_command_line_with_its_own_flags_last() -> None:
    argv = ["--workers", "3", "--port", "0", "--max-batch-size", "8"]
    settings = vision_config.settings_from_args([*argv, "--spool-dir", "var/spool"])
    supervisor = WorkerSupervisor(settings, argv)
    supervisor.port = 50123
    command = supervisor.worker_command(Worker(1, Path("/run/w1.json")))
    assert command[1:3] == ["-m", "snaplearn_vision.main"]
    parsed = vision_config.settings_from_args(command[3:])  # argparse keeps the last occurrence
    assert (parsed.workers, parsed.worker_index, parsed.port, parsed.metrics_port) == (1, 1, 50123, 0)
    assert parsed.max_batch_size == 8
    assert parsed.ready_file == Path("/run/w1.json")
    assert parsed.spool_dir == Path("var/spool/worker-1")


def test_workers_and_publish_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = vision_config.settings_from_args([])
    assert (defaults.workers, defaults.worker_index) == (1, None)
    assert defaults.bus is not None  # publishing is on by default
    assert vision_config.settings_from_args(["--no-publish"]).bus is None
    monkeypatch.setenv("SNAPLEARN_VISION_WORKERS", "4")
    monkeypatch.setenv("SNAPLEARN_VISION_PUBLISH", "0")
    from_env = vision_config.settings_from_args([])
    assert from_env.workers == 4
    assert from_env.bus is None
    assert vision_config.settings_from_args(["--workers", "2"]).workers == 2  # the flag wins


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--worker-index", "-1"]])
def test_invalid_worker_settings_are_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        vision_config.settings_from_args(argv)
    assert exited.value.code == 2
