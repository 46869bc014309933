"""Issue 19: a user's own network, added with `snaplearn-vision models add` in each format,
served by the real vision server (gRPC on port 0, the dynamic batcher) and answering what the
network computes; a broken version is FAILED_PRECONDITION naming the file, not INTERNAL."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from snaplearn_vision import models
from tests.helpers.model_formats import (
    SIZE,
    colour_photo,
    export_onnx,
    export_program,
    export_torchscript,
    write_labels,
)
from tests.helpers.vision_server import ServerFactory, expect_status, request, until

PREPROCESSING = ["--input-size", str(SIZE), str(SIZE), "--mean", "0", "0", "0", "--std", "1", "1", "1"]
PHOTOS = {"red": (250, 20, 20), "green": (30, 220, 40), "blue": (10, 20, 200)}


async def first_answer(call: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    """A model is loaded on its first call, which answers UNAVAILABLE (retry) until it is warm."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)


def queued(batcher: Any, depth: int) -> bool:
    return bool(batcher.queue_depth == depth)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """colour-ts, colour-export and colour-onnx, each added through the command line; broken/1
    written by hand (a file copied in without `models add`) with too many labels."""
    root = tmp_path / "repo"
    labels = write_labels(tmp_path / "labels.txt")
    for name, file in (
        ("colour-ts", export_torchscript(tmp_path / "colour.pt")),
        ("colour-export", export_program(tmp_path / "colour.pt2")),
        ("colour-onnx", export_onnx(tmp_path / "colour.onnx")),
    ):
        argv = ["--repository", str(root), "add", name, "--file", str(file), "--labels", str(labels)]
        assert models.main([*argv, *PREPROCESSING]) == 0
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes((root / "colour-onnx" / "1" / "model.onnx").read_bytes())
    config = json.loads((root / "colour-onnx" / "1" / "config.json").read_text())
    config["labels"] = ["red", "green", "blue", "white"]
    (broken / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
async def servers(repository: Path, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    factory = ServerFactory(repository, tmp_path)
    yield factory
    await factory.close()


async def test_each_format_serves_through_the_batcher(servers: ServerFactory) -> None:
    # The default model is the ONNX one: the server starts, loads and warms it like any other.
    running = await servers.start(model_name="colour-onnx", model_version="1", max_batch_size=8)
    photos = list(PHOTOS.values()) * 3
    for name in ("colour-onnx", "colour-ts", "colour-export"):
        blank = request(colour_photo((0, 0, 0)), model_name=name)
        await first_answer(functools.partial(running.stub.Classify, blank, timeout=30))
        # A batch held in the model thread while nine more calls queue: they run as one batch.
        await running.gates.hold_next_batch()
        held = asyncio.ensure_future(running.stub.Classify(blank, timeout=30))
        await running.gates.wait_batch_held()
        calls = [
            asyncio.ensure_future(
                running.stub.Classify(request(colour_photo(rgb), model_name=name, top_k=3), timeout=30)
            )
            for rgb in photos
        ]
        batcher = running.server.service.batcher_for(name, "1") if running.server.service else None
        assert batcher is not None
        await until(functools.partial(queued, batcher, 9), "all calls queued")
        running.gates.open.set()
        await held
        replies = await asyncio.gather(*calls)
        assert [reply.labels[0].label for reply in replies] == list(PHOTOS) * 3, name
        assert all(reply.labels[0].score > 0.99 for reply in replies)
        assert {(reply.model_name, reply.model_version) for reply in replies} == {(name, "1")}
        assert {reply.batch_size for reply in replies} == {8, 1}, name  # max_batch_size 8, then the rest


async def test_a_broken_version_is_failed_precondition_naming_the_file(
    servers: ServerFactory, repository: Path
) -> None:
    running = await servers.start(model_name="colour-ts", model_version="1")
    red = request(colour_photo(PHOTOS["red"]), model_name="broken")
    details = await expect_status(
        first_answer(lambda: running.stub.Classify(red, timeout=30)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "broken/1: model.onnx (ONNX) returns 3 scores per image, but config.json has 4 labels" in details
    assert str(repository) not in details
    # The server keeps serving its other models.
    reply = await running.stub.Classify(request(colour_photo(PHOTOS["blue"])), timeout=30)
    assert reply.labels[0].label == "blue"
