"""The rate limit is per caller per pod, not per worker process: `snaplearn_vision.main
--workers 2 --rate-limit-per-s R` as a real process tree, a caller whose calls arrive over
many connections (the kernel spreads them over both workers) gets one bucket between them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snaplearn.vision.v1 import vision_pb2_grpc
from snaplearn_common.metrics import scrape
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import correctly_classified_images, request

pytestmark = pytest.mark.timeout(180)

BURST = 20
OK_REQUESTS = 'snaplearn_vision_request_seconds_count{code="OK"}'


@pytest.fixture
def pod(trained_model_repository: Path, tmp_path: Path) -> Iterator[dict[str, object]]:  # noqa: F811
    ready_file = tmp_path / "run" / "vision.json"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "snaplearn_vision.main", "--workers", "2",
            "--port", "0", "--metrics-port", "0",
            "--model-repository", str(trained_model_repository), "--device", "cpu", "--decode-threads", "1",
            "--ready-file", str(ready_file),
            "--bus", "embedded", "--bus-path", str(tmp_path / "bus.db"),
            "--spool-dir", str(tmp_path / "spool"),
            # A refill so slow that no token comes back during the test: what passes is the burst.
            "--rate-limit-per-s", "0.001", "--rate-limit-burst", str(BURST),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        assert line.startswith("vision server ready on"), f"supervisor exited with {process.poll()}"
        yield json.loads(ready_file.read_text())
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_one_bucket_per_caller_across_worker_processes(
    pod: dict[str, object],
    trained_model_repository: Path,  # noqa: F811
) -> None:
    photo = correctly_classified_images(Path(trained_model_repository))["geometry"]
    port = pod["port"]
    outcomes: list[tuple[grpc.StatusCode, str, dict[str, str]]] = []
    for index in range(3 * BURST):  # each call on its own connection, as from separate phones
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            try:
                stub.Classify(request(photo, user=f"student-{index}"), timeout=30)
            except grpc.RpcError as error:
                trailers = {key: str(value) for key, value in error.trailing_metadata() or ()}
                outcomes.append((error.code(), error.details() or "", trailers))
            else:
                outcomes.append((grpc.StatusCode.OK, "", {}))
    workers = pod["workers"]
    assert isinstance(workers, list)
    served = [scrape(worker["metrics_port"]).get(OK_REQUESTS, 0.0) for worker in workers]
    # The calls reached both workers (else this would not test sharing) ...
    assert min(served) > 0, served
    # ... and between them they let through one burst, not one per worker.
    codes = [code for code, _, _ in outcomes]
    assert codes.count(grpc.StatusCode.OK) == BURST == sum(served), (codes, served)
    refused = [(message, trailers) for code, message, trailers in outcomes if code != grpc.StatusCode.OK]
    assert len(refused) == 2 * BURST
    for message, trailers in refused:
        assert message.startswith("rate limit of 0.001 calls/s for this caller; retry in ")
        assert int(trailers["grpc-retry-pushback-ms"]) > 0
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code in codes if code != grpc.StatusCode.OK)
