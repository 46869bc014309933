"""Worker processes behind one port, as operators run them: `snaplearn_vision.main --workers 2`
as a real process tree (supervisor + 2 workers, each loading the small trained model), a real
embedded event bus, real gRPC connections. Waiting is on conditions (ready files, metrics,
process exits), never fixed sleeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from snaplearn.vision.v1 import vision_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import decode_image_classified
from snaplearn_common.metrics import scrape
from snaplearn_vision import models as snaplearn_models
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import correctly_classified_images, read_events, request

pytestmark = pytest.mark.timeout(180)

OK_REQUESTS = 'snaplearn_vision_request_seconds_count{code="OK"}'


@pytest.fixture(scope="module")
def model_root(trained_model_repository: Path) -> Path:  # noqa: F811
    return Path(trained_model_repository)


@pytest.fixture(scope="module")
def images(model_root: Path) -> dict[str, bytes]:
    return correctly_classified_images(model_root)


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def start_supervisor(model_root: Path, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "snaplearn_vision.main", "--workers", "2",
            "--port", "0", "--metrics-port", "0",
            "--model-repository", str(model_root), "--device", "cpu", "--decode-threads", "1",
            "--ready-file", str(tmp_path / "run" / "vision.json"),
            "--bus", "embedded", "--bus-path", str(tmp_path / "bus.db"),
            "--spool-dir", str(tmp_path / "spool"), *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest.fixture
def supervisor(model_root: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    process = start_supervisor(model_root, tmp_path)
    assert process.stdout is not None
    ready_line = process.stdout.readline().strip()  # blocks until the line (or EOF on failure)
    try:
        assert ready_line.startswith("vision server ready on"), f"supervisor exited with {process.poll()}"
        yield process, tmp_path / "run" / "vision.json", ready_line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def classify_on_new_connections(port: int, image: bytes, users: list[str]) -> list[str]:
    """One call per user, each on its own channel (its own TCP connection, as separate phones)."""
    labels = []
    for user in users:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            reply = vision_pb2_grpc.VisionServiceStub(channel).Classify(request(image, user=user), timeout=30)
            labels.append(reply.labels[0].label)
    return labels


def served_by_each_worker(ready: dict[str, Any]) -> list[float]:
    return [scrape(worker["metrics_port"]).get(OK_REQUESTS, 0.0) for worker in ready["workers"]]


def test_two_workers_share_the_port_sum_their_metrics_survive_a_crash_and_drain_on_sigterm(
    supervisor: tuple[subprocess.Popen[str], Path, str], tmp_path: Path, images: dict[str, bytes]
) -> None:
    process, ready_file, ready_line = supervisor
    ready = json.loads(ready_file.read_text())
    port, metrics_port = ready["port"], ready["metrics_port"]
    assert ready_line == f"vision server ready on 127.0.0.1:{port} (metrics :{metrics_port}, 2 workers)"
    assert ready["pid"] == process.pid
    assert [w["index"] for w in ready["workers"]] == [0, 1]
    worker_pids = [w["pid"] for w in ready["workers"]]
    assert len(set(worker_pids)) == 2 and all(alive(pid) for pid in worker_pids)

    # New connections are spread by the kernel: call until both workers have served some.
    users: list[str] = []
    while min(served_by_each_worker(ready)) == 0:
        assert len(users) < 200, f"one worker got none of {len(users)} connections"
        batch = [f"student-{len(users) + i}" for i in range(8)]
        assert classify_on_new_connections(port, images["geometry"], batch) == ["geometry"] * 8
        users += batch
    per_worker = served_by_each_worker(ready)
    assert sum(per_worker) == len(users)
    pod = scrape(metrics_port)  # the supervisor's /metrics: the workers' sum
    assert pod[OK_REQUESTS] == len(users)
    assert pod["snaplearn_vision_workers"] == 2
    assert pod['snaplearn_vision_queue_capacity{model="worksheet-topics:1"}'] == 2 * 256
    with SqliteEventBus(tmp_path / "bus.db") as bus:  # both workers publish to the one bus
        assert sorted(decode_image_classified(r).user_id for r in read_events(bus, len(users))) == sorted(
            users
        )

    # A worker killed outright is restarted; the other serves meanwhile and after.
    os.kill(worker_pids[0], signal.SIGKILL)
    restarted = wait_for(
        lambda: (
            (r := json.loads(ready_file.read_text()))["workers"][0]["pid"] not in worker_pids
            and r["workers"][0]["metrics_port"] is not None
            and r
        ),
        "worker 0 to be restarted",
    )
    assert restarted["workers"][1]["pid"] == worker_pids[1]
    assert classify_on_new_connections(port, images["geometry"], ["after-crash"]) == ["geometry"]
    pod = scrape(metrics_port)
    assert pod["snaplearn_vision_worker_restarts_total"] == 1
    assert pod["snaplearn_vision_workers"] == 2

    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors[-3000:]
    all_pids = [w["pid"] for w in restarted["workers"]]
    assert not any(alive(pid) for pid in all_pids)
    assert not ready_file.exists()
    assert "worker 0 (pid" in errors and "exited with code -9" in errors


def test_a_worker_that_cannot_start_fails_the_start_instead_of_restarting_forever(
    model_root: Path, tmp_path: Path
) -> None:
    process = start_supervisor(model_root, tmp_path, "--model-name", "no-such-model")
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 1
    assert output == ""  # never announced ready
    assert "exited with code 1 before serving" in errors
    assert "no-such-model" in errors  # the worker's own reason, on the shared stderr
    assert not (tmp_path / "run" / "vision.json").exists()


def test_workers_stop_when_the_supervisor_is_killed(
    supervisor: tuple[subprocess.Popen[str], Path, str],
) -> None:
    process, ready_file, _ = supervisor
    worker_pids = [w["pid"] for w in json.loads(ready_file.read_text())["workers"]]
    process.kill()  # SIGKILL: no chance to stop its workers itself
    process.wait()
    wait_for(lambda: not any(alive(pid) for pid in worker_pids), "the orphaned workers to stop")


def versions_on_new_connections(port: int, image: bytes, count: int) -> list[str]:
    """The model version that answers one call on each of `count` new connections."""
    versions = []
    for index in range(count):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            versions.append(stub.Classify(request(image, user=f"after-{index}"), timeout=30).model_version)
    return versions


def loaded_versions(worker: dict[str, Any]) -> set[str]:
    """The versions of the default model a worker has loaded, from its own /metrics."""
    prefix = 'snaplearn_vision_queue_capacity{model="worksheet-topics:'
    keys = scrape(worker["metrics_port"])
    return {key[len(prefix) :].split('"')[0] for key in keys if key.startswith(prefix)}


def test_every_worker_serves_a_version_added_with_models_add_within_a_poll(
    model_root: Path, tmp_path: Path, images: dict[str, bytes]
) -> None:
    """Each worker reads the repository itself: after `models add` every worker loads, warms and
    swaps to version 2 on its own next poll and drops version 1 (outside its latest-1 policy)."""
    root = tmp_path / "models"
    shutil.copytree(model_root, root)
    version_1 = root / "worksheet-topics" / "1"
    config = json.loads((version_1 / "config.json").read_text())
    (tmp_path / "labels.txt").write_text("\n".join(config["labels"]) + "\n")
    poll_s = 0.2
    process = start_supervisor(root, tmp_path, "--model-version", "", "--model-poll-interval", str(poll_s))
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("vision server ready on"), process.poll()
        ready = json.loads((tmp_path / "run" / "vision.json").read_text())
        assert [loaded_versions(worker) for worker in ready["workers"]] == [{"1"}, {"1"}]

        added_at = time.monotonic()
        add = [
            "--repository", str(root), "add", "worksheet-topics",
            "--file", str(version_1 / "model.pt"), "--architecture", "snapnet",
            "--labels", str(tmp_path / "labels.txt"), "--channels", "1",
            "--input-size", *map(str, config["input_size"]),
            "--mean", *map(str, config["mean"]), "--std", *map(str, config["std"]),
        ]  # fmt: skip
        assert snaplearn_models.main(add) == 0
        # The bound: a poll, then the load and warm-up of a small model, on a busy machine.
        wait_for(
            lambda: all(loaded_versions(worker) == {"2"} for worker in ready["workers"]),
            "every worker to serve version 2 alone",
            timeout_s=30,
        )
        swapped_in_s = time.monotonic() - added_at
        assert versions_on_new_connections(ready["port"], images["geometry"], 8) == ["2"] * 8
        assert swapped_in_s < 30

        assert snaplearn_models.main(["--repository", str(root), "remove", "worksheet-topics", "1"]) == 0
        assert all(loaded_versions(worker) == {"2"} for worker in ready["workers"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
