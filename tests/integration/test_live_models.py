"""Managing models while serving: a real server on port 0 polling a real repository of tiny models.

Versions are written the way `snaplearn-vision models add` writes them (a directory renamed into
place); the server must notice, load and warm them off the serving path, swap them in with no
failed call, keep a broken one out while the old one serves, and answer the Open Inference
Protocol's model-repository extension as NVIDIA's own client (tritonclient) expects.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from snaplearn.vision.v1 import vision_pb2_grpc
from snaplearn_oip import grpc_service_pb2 as oip
from snaplearn_oip import grpc_service_pb2_grpc as oip_grpc
from snaplearn_vision import config as vision_config
from snaplearn_vision import models as snaplearn_models
from snaplearn_vision.core.versions import LOADING, READY, UNAVAILABLE
from snaplearn_vision.runtime.architectures import build_model
from snaplearn_vision.runtime.model_repository import ModelRepository
from snaplearn_vision.schema import BatchingConfig, ModelConfig
from snaplearn_vision.server import VisionServer, model_health_name
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.model_formats import SIZE, ColourNet, colour_photo, export_torchscript, write_labels
from tests.helpers.vision_server import (
    GatedModels,
    Gates,
    Running,
    ServerFactory,
    expect_status,
    request,
    until,
)

pytestmark = pytest.mark.timeout(180)

NAME = "tiny"
LABELS = ("circle", "square", "triangle")
POLL_S = 0.05


def add_version(root: Path, name: str, version: str, seed: int = 0, **config: Any) -> Path:
    """A tiny randomly initialised SnapNet, written atomically as a new version."""
    torch.manual_seed(seed)
    model_config = ModelConfig(
        architecture="snapnet",
        labels=config.pop("labels", LABELS),
        input_size=(32, 32),
        channels=1,
        batching=BatchingConfig(max_batch_size=4, max_queue_delay_ms=1.0),
        **config,
    )
    network = build_model("snapnet", len(model_config.labels), 1)
    return ModelRepository(root).save(name, version, model_config, network)


def add_broken_version(root: Path, name: str, version: str) -> Path:
    """A version whose config is fine but whose weights file is garbage, renamed into place whole."""
    good = next(p for p in sorted((root / name).iterdir()) if p.name.isdigit())
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root / name))
    shutil.copy(good / "config.json", staging / "config.json")
    (staging / "model.pt").write_bytes(b"this is not a state_dict")
    target = root / name / version
    staging.rename(target)
    return target


def remove_version(root: Path, name: str, version: str) -> None:
    """As `models remove` does: out of the listing in one rename, then deleted."""
    hidden = root / name / f".removed-{version}"
    (root / name / version).rename(hidden)
    shutil.rmtree(hidden)


@pytest.fixture
def image() -> bytes:
    return sample_image_bytes("fractions", seed=0)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    add_version(root, NAME, "1", seed=1)
    return root


@pytest.fixture
async def factory(repository: Path, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    factory = ServerFactory(repository, tmp_path)
    yield factory
    await factory.close()


async def start(factory: ServerFactory, **overrides: Any) -> Running:
    values = {"model_name": NAME, "model_version": "", "model_poll_interval_s": POLL_S, "max_batch_size": 4}
    return await factory.start(**{**values, **overrides})


def states(running: Running, name: str = NAME) -> dict[str, tuple[str, str]]:
    assert running.server.service is not None
    return {
        row.version: (row.state, row.reason)
        for row in running.server.service.repository_index()
        if row.name == name
    }


def metric(running: Running, text: str) -> float:
    for family in running.server.metrics.registry.collect():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            if f"{sample.name}{{{labels}}}" == text or (not labels and sample.name == text):
                return float(sample.value)
    return 0.0


async def test_swap_under_a_stream_of_calls_fails_none(
    factory: ServerFactory, repository: Path, image: bytes
) -> None:
    running = await start(factory)
    answers: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            try:
                reply = await running.stub.Classify(request(image), timeout=30)
                answers.append(reply.model_version)
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    await until(lambda: len(answers) >= 20, "calls answered by version 1")
    add_version(repository, NAME, "2", seed=2)
    await until(lambda: "2" in answers, "a call answered by version 2")
    first_v2 = answers.index("2")
    remove_version(repository, NAME, "1")
    await until(lambda: "1" not in states(running), "version 1 unloaded")
    count = len(answers)
    await until(lambda: len(answers) >= count + 20, "calls after the swap")
    stop.set()
    await asyncio.gather(*callers)

    assert failures == []
    assert set(answers[:first_v2]) == {"1"}
    assert answers[-10:] == ["2"] * 10
    assert running.server.service is not None
    assert running.server.service.batcher_for(NAME, "1") is None
    assert states(running) == {"2": (READY, "")}
    assert metric(running, f'snaplearn_vision_model_swaps_total{{model="{NAME}"}}') == 1
    assert metric(running, f'snaplearn_vision_model_versions_ready{{model="{NAME}"}}') == 1
    # Version 1's batching series are gone with it.
    assert metric(running, f'snaplearn_vision_queue_capacity{{model="{NAME}:1"}}') == 0


async def test_calls_queued_on_the_old_version_finish_there(
    factory: ServerFactory, repository: Path, image: bytes
) -> None:
    running = await start(factory)
    await running.gates.hold_next_batch()
    held = [asyncio.ensure_future(running.stub.Classify(request(image), timeout=60)) for _ in range(3)]
    await running.gates.wait_batch_held()
    await until(
        lambda: metric(running, "snaplearn_vision_in_flight_requests") == 3, "three calls admitted to v1"
    )

    add_version(repository, NAME, "2", seed=2)  # latest 1: version 1 leaves the policy
    await until(lambda: states(running).get("1", ("",))[0] == "UNLOADING", "version 1 draining")
    assert states(running)["2"][0] == READY
    running.gates.open.set()
    replies = await asyncio.gather(*held)
    assert [reply.model_version for reply in replies] == ["1", "1", "1"]
    reply = await running.stub.Classify(request(image), timeout=30)
    assert reply.model_version == "2"
    # Still on disk, but outside the policy: unloaded once drained.
    await until(lambda: states(running)["1"][0] == UNAVAILABLE, "version 1 unloaded once drained")
    assert "outside its version policy" in states(running)["1"][1]


async def test_a_broken_version_is_refused_while_the_old_one_serves(
    factory: ServerFactory, repository: Path, image: bytes
) -> None:
    running = await start(factory)
    add_broken_version(repository, NAME, "2")
    await until(lambda: "failed" in states(running).get("2", ("", ""))[1], "version 2 refused")

    _, reason = states(running)["2"]
    assert "failed to load" in reason and "model.pt" in reason
    assert str(repository) not in reason
    assert states(running)["1"] == (READY, "")
    assert metric(running, f'snaplearn_vision_model_load_failures_total{{model="{NAME}"}}') == 1
    reply = await running.stub.Classify(request(image), timeout=30)
    assert reply.model_version == "1"
    health = health_pb2_grpc.HealthStub(running.channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest(service=""))
    ).status == health_pb2.HealthCheckResponse.SERVING
    details = await expect_status(
        running.stub.Classify(request(image, model_name=NAME, model_version="2")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert f"model {NAME} version 2 failed to load" in details and "model.pt" in details
    assert str(repository) not in details and "/tmp" not in details
    # Polls do not retry (or count) the same broken files again.
    polls = metric(running, f'snaplearn_vision_model_load_failures_total{{model="{NAME}"}}')
    assert running.server.service is not None
    for _ in range(3):
        await running.server.service.refresh_models()  # what each poll does
    assert metric(running, f'snaplearn_vision_model_load_failures_total{{model="{NAME}"}}') == polls

    # Written again (fixed), it is tried again and takes over.
    shutil.rmtree(repository / NAME / "2")
    add_version(repository, NAME, "2", seed=2)
    await until(lambda: states(running).get("2", ("",))[0] == READY, "fixed version 2 loaded")
    reply = await running.stub.Classify(request(image), timeout=30)
    assert reply.model_version == "2"


async def test_version_policy_from_the_model_config(
    factory: ServerFactory, repository: Path, image: bytes
) -> None:
    policy = repository / NAME / "config.json"
    policy.write_text(json.dumps({"version_policy": {"latest": {"num_versions": 2}}}))
    add_version(repository, NAME, "2", seed=2)
    add_version(repository, NAME, "3", seed=3)
    running = await start(factory)
    await until(lambda: states(running).get("2", ("",))[0] == READY, "versions 2 and 3 loaded")
    assert states(running)["3"] == (READY, "")
    assert states(running)["1"][0] == UNAVAILABLE and "latest 2 versions" in states(running)["1"][1]
    for version in ("2", "3"):
        reply = await running.stub.Classify(
            request(image, model_name=NAME, model_version=version), timeout=30
        )
        assert reply.model_version == version
    assert (await running.stub.Classify(request(image), timeout=30)).model_version == "3"
    details = await expect_status(
        running.stub.Classify(request(image, model_name=NAME, model_version="1")), grpc.StatusCode.NOT_FOUND
    )
    assert "version policy" in details and "2, 3" in details

    policy.write_text(json.dumps({"version_policy": {"specific": {"versions": [1]}}}))
    await until(lambda: states(running).get("1", ("",))[0] == READY, "version 1 loaded by policy")
    await until(lambda: states(running)["3"][0] == UNAVAILABLE, "versions 2 and 3 unloaded")
    assert (await running.stub.Classify(request(image), timeout=30)).model_version == "1"

    policy.write_text(json.dumps({"version_policy": {"newest": {}}}))  # invalid: what serves stays
    await until(lambda: "newest" in states(running)["2"][1], "the invalid policy reported")
    assert (await running.stub.Classify(request(image), timeout=30)).model_version == "1"

    policy.write_text(json.dumps({"version_policy": {"all": {}}}))
    await until(lambda: all(state == READY for state, _ in states(running).values()), "all versions")
    assert set(states(running)) == {"1", "2", "3"}


class SlowLoads(GatedModels):
    """The gated test models, but loading `name` waits for a gate: a load caught in the act."""

    def __init__(self, root: Path, gates: Gates, name: str) -> None:
        super().__init__(root, gates)
        self.slow_name = name
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.loaded: list[Any] = []

    def load(self, name: str, version: str | None = None) -> Any:
        if name == self.slow_name:
            self.started.set()
            assert self.proceed.wait(60), "test never let the load proceed"
        model = super().load(name, version)
        self.loaded.append(model)
        return model


async def test_repository_extension_through_tritonclient(
    repository: Path, tmp_path: Path, image: bytes
) -> None:
    add_version(repository, "other", "1", seed=4, labels=("a", "b"))
    add_version(repository, "broken", "1", seed=5)
    (repository / "broken" / "1" / "model.pt").write_bytes(b"garbage")
    settings = vision_config.VisionSettings.from_env(
        {},
        port=0,
        metrics_port=0,
        model_repository=repository,
        model_name=NAME,
        model_version="",
        device="cpu",
        publish=False,
        spool_dir=None,
        model_poll_interval_s=POLL_S,
        shutdown_grace_s=2.0,
    )
    models = SlowLoads(repository, Gates(), "other")
    server = VisionServer(settings, models=models)
    await server.start()
    client = triton_aio.InferenceServerClient(server.target)
    channel = grpc.aio.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        assert "model_repository" in (await client.get_server_metadata()).extensions
        index = {
            (m.name, m.version): (m.state, m.reason)
            for m in (await client.get_model_repository_index()).models
        }
        assert index[(NAME, "1")] == (READY, "")
        assert index[("other", "1")][0] == UNAVAILABLE and "not loaded" in index[("other", "1")][1]
        assert server.service is not None
        assert [(r.name, r.version) for r in server.service.repository_index(ready_only=True)] == [
            (NAME, "1")
        ]
        assert not await client.is_model_ready("other")

        # Loading: the call that asks meanwhile hears UNAVAILABLE with a retry hint.
        load = asyncio.ensure_future(client.load_model("other"))
        await asyncio.to_thread(models.started.wait, 30)
        assert index_state(await client.get_model_repository_index(), "other", "1") == LOADING
        message = await expect_triton(client.get_model_metadata("other", "1"), "StatusCode.UNAVAILABLE")
        assert "loading" in message and "retry" in message
        models.proceed.set()
        await load
        assert await client.is_model_ready("other")
        assert await client.is_model_ready("other", "1")
        await until_health(health, "other", health_pb2.HealthCheckResponse.SERVING)
        metadata = await client.get_model_metadata("other")
        assert metadata.outputs[0].shape == [-1, 2]

        await client.unload_model("other")
        assert not await client.is_model_ready("other")
        # Unload answers once the version drained and its memory was given back (the network closed).
        assert [m.closed for m in models.loaded if m.name == "other"] == [True]
        assert index_state(await client.get_model_repository_index(), "other", "1") == UNAVAILABLE
        assert server.service.batcher_for("other", "1") is None
        message = await expect_triton(client.get_model_metadata("other"), "StatusCode.FAILED_PRECONDITION")
        assert "unloaded" in message and "RepositoryModelLoad" in message
        await until_health(health, "other", health_pb2.HealthCheckResponse.NOT_SERVING)
        await client.load_model("other")  # loaded again after an unload
        assert await client.is_model_ready("other")

        message = await expect_triton(client.load_model("broken"), "StatusCode.FAILED_PRECONDITION")
        assert "broken" in message and "failed to load" in message and str(repository) not in message
        message = await expect_triton(client.load_model("no-such-model"), "StatusCode.NOT_FOUND")
        assert "models that can serve" in message and "other" in message and NAME in message
        assert "broken" not in message  # only models that can serve are listed
        message = await expect_triton(client.unload_model(NAME), "StatusCode.FAILED_PRECONDITION")
        assert "default model" in message
        message = await expect_triton(
            client.load_model("other", config='{"max_batch_size": 2}'), "StatusCode.INVALID_ARGUMENT"
        )
        assert "models add" in message
        await client.unload_model("other", unload_dependents=True)
        assert not await client.is_model_ready("other")
        assert await client.is_server_ready()
    finally:
        await client.close()
        await channel.close()
        models.proceed.set()
        await server.stop()


async def until_health(health: Any, model: str, status: int) -> None:
    """The health entry is set by a task the model change schedules: wait for it, bounded."""
    for _ in range(500):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=model_health_name(model)))
        if reply.status == status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"health of {model} never became {status}")


def index_state(index: Any, name: str, version: str) -> str:
    return next(m.state for m in index.models if (m.name, m.version) == (name, version))


async def expect_triton(call: Any, status: str) -> str:
    with pytest.raises(InferenceServerException) as raised:
        await call
    assert raised.value.status() == status, raised.value.message()
    return raised.value.message() or ""


async def test_a_loading_model_answers_unavailable_with_a_retry_pushback(
    repository: Path, tmp_path: Path, image: bytes
) -> None:
    """A call naming a model whose load is held at a gate: UNAVAILABLE, the hint in words and as
    the grpc-retry-pushback-ms trailer (what a gRPC retry policy waits for), on Classify and OIP."""
    add_version(repository, "other", "1", seed=4, labels=("a", "b"))
    settings = vision_config.VisionSettings.from_env(
        {},
        port=0,
        metrics_port=0,
        model_repository=repository,
        model_name=NAME,
        model_version="",
        device="cpu",
        publish=False,
        spool_dir=None,
        model_poll_interval_s=POLL_S,
        shutdown_grace_s=2.0,
    )
    models = SlowLoads(repository, Gates(), "other")
    server = VisionServer(settings, models=models)
    await server.start()
    channel = grpc.aio.insecure_channel(server.target)
    try:
        assert server.service is not None
        load = asyncio.ensure_future(server.service.load_model("other"))
        await asyncio.to_thread(models.started.wait, 30)
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for call in (
            stub.Classify(request(image, model_name="other"), timeout=30),
            stub.Classify(request(image, model_name="other", model_version="1"), timeout=30),
            oip_stub.ModelMetadata(oip.ModelMetadataRequest(name="other"), timeout=30),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            error = raised.value
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            trailers = dict(error.trailing_metadata() or ())
            pushback_ms = int(trailers["grpc-retry-pushback-ms"])
            # The server's own last load (the default model's) is the estimate, within the bounds.
            assert 250 <= pushback_ms <= 30_000
            details = error.details() or ""
            assert "is loading" in details and f"retry in {pushback_ms / 1000:.1f} s" in details
        models.proceed.set()
        await load
        reply = await stub.Classify(request(image, model_name="other"), timeout=30)
        assert reply.model_name == "other" and reply.model_version == "1"
    finally:
        models.proceed.set()
        await channel.close()
        await server.stop()


# -- `models add --server`: the version goes live through the server at once ------------------


class SmallBatchesOnly(torch.nn.Module):
    """Runs batches of 1 and 2 (what `models add` tests) but fails above: the server's warm-up,
    which runs every batch size up to the max, is what refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ColourNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise RuntimeError("batches above 2 are not supported")
        return self.net(x)


COLOUR_PREPROCESSING = ["--input-size", str(SIZE), str(SIZE), "--mean", "0", "0", "0", "--std", "1", "1", "1"]


def colour_add(root: Path, labels: Path, file: Path, *extra: str) -> list[str]:
    return [
        "--repository", str(root), "add", "colour", "--file", str(file), "--labels", str(labels),
        "--max-batch-size", "4", *COLOUR_PREPROCESSING, *extra,
    ]  # fmt: skip


async def test_models_add_with_server_swaps_at_once_under_calls_and_takes_back_a_refused_version(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "colour-repo"
    labels = write_labels(tmp_path / "labels.txt")
    assert snaplearn_models.main(colour_add(root, labels, export_torchscript(tmp_path / "v1.pt"))) == 0
    factory = ServerFactory(root, tmp_path)
    try:
        # No poll in this test's lifetime: only the command's RepositoryModelLoad can swap.
        running = await factory.start(
            model_name="colour", model_version="", model_poll_interval_s=3600.0, max_batch_size=4
        )
        red = request(colour_photo((250, 20, 20)))
        answers: list[tuple[float, str]] = []  # (sent at, version)
        failures: list[str] = []
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = await running.stub.Classify(red, timeout=30)
                    assert reply.labels[0].label == "red"
                    answers.append((sent, reply.model_version))
                except grpc.aio.AioRpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")

        callers = [asyncio.create_task(caller()) for _ in range(3)]
        await until(lambda: len(answers) >= 10, "calls answered by version 1")
        target = running.server.target
        v2 = export_torchscript(tmp_path / "v2.pt")
        code = await asyncio.to_thread(
            snaplearn_models.main, colour_add(root, labels, v2, "--server", target)
        )
        returned = time.monotonic()
        out = capfd.readouterr().out
        assert code == 0
        assert "tested at batch sizes 1, 2" in out
        assert f"server {target} serves colour version 2" in out
        count = len(answers)
        await until(lambda: len(answers) >= count + 10, "calls after the command returned")

        # A version that passes the command's test batch but fails the server's warm-up.
        refused = tmp_path / "v3.pt"
        export_torchscript(refused, SmallBatchesOnly())
        code = await asyncio.to_thread(
            snaplearn_models.main, colour_add(root, labels, refused, "--server", target)
        )
        err = capfd.readouterr().err
        assert code == 1
        assert f"server {target} refused colour version 3" in err and "failed to load" in err
        assert "batches above 2" in err and str(root) not in err
        assert "taken out of the repository" in err
        assert sorted(p.name for p in (root / "colour").iterdir()) == ["1", "2"]
        count = len(answers)
        await until(lambda: len(answers) >= count + 10, "calls after the refusal")
        stop.set()
        await asyncio.gather(*callers)

        assert failures == []
        assert {version for sent, version in answers if sent > returned} == {"2"}
        assert answers[0][1] == "1"
        assert states(running, "colour")["2"] == (READY, "")
        assert metric(running, 'snaplearn_vision_model_swaps_total{model="colour"}') == 1
    finally:
        await factory.close()
