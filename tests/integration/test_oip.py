"""The Open Inference Protocol (KServe v2) beside our own API, driven by NVIDIA's own client.

tritonclient (unchanged, from PyPI) talks to a real in-process vision server on port 0 with the
small trained model: health, metadata, Triton's ModelConfig, batched inference with the
classification extension, errors as status codes, and events only when a user is named.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from snaplearn_common.events import decode_image_classified
from snaplearn_vision.edges.oip import (
    INPUT_NAME,
    OUTPUT_NAME,
    encode_bytes_tensor,
    parse_bytes_tensor,
)
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import (
    MODEL_NAME,
    MODEL_VERSION,
    Running,
    ServerFactory,
    correctly_classified_images,
    read_events,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model_root(trained_model_repository: Path) -> Path:  # noqa: F811
    return Path(trained_model_repository)


@pytest.fixture(scope="module")
def images(model_root: Path) -> dict[str, bytes]:
    return correctly_classified_images(model_root)


@pytest.fixture
async def running(model_root: Path, tmp_path: Path) -> AsyncIterator[Running]:
    factory = ServerFactory(model_root, tmp_path)
    running = await factory.start()
    running.gates.open.set()  # these tests never hold a batch
    yield running
    await factory.close()


@pytest.fixture
async def client(running: Running) -> AsyncIterator[triton_aio.InferenceServerClient]:
    client = triton_aio.InferenceServerClient(running.server.target)
    yield client
    await client.close()


def image_input(*photos: bytes) -> triton.InferInput:
    tensor = triton.InferInput(INPUT_NAME, [len(photos), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[photo] for photo in photos], dtype=np.object_))
    return tensor


async def expect_error(call: object, status: str) -> str:
    with pytest.raises(InferenceServerException) as raised:
        await call  # type: ignore[misc]
    assert raised.value.status() == status, raised.value.message()
    return raised.value.message() or ""


async def test_health_metadata_and_model_config(
    client: triton_aio.InferenceServerClient, running: Running
) -> None:
    assert await client.is_server_live()
    assert await client.is_server_ready()
    assert await client.is_model_ready(MODEL_NAME)
    assert await client.is_model_ready(MODEL_NAME, MODEL_VERSION)
    assert not await client.is_model_ready("no-such-model")

    server = await client.get_server_metadata(as_json=True)
    assert server["name"] == "snaplearn-vision"
    assert "classification" in server["extensions"]

    model = running.server.service.default_model  # type: ignore[union-attr]
    assert model is not None
    metadata = await client.get_model_metadata(MODEL_NAME, as_json=True)
    assert metadata["name"] == MODEL_NAME and metadata["versions"] == [MODEL_VERSION]
    assert metadata["inputs"] == [{"name": INPUT_NAME, "datatype": "BYTES", "shape": ["-1", "1"]}]
    assert metadata["outputs"] == [
        {"name": OUTPUT_NAME, "datatype": "FP32", "shape": ["-1", str(len(model.labels))]}
    ]

    config = (await client.get_model_config(MODEL_NAME, as_json=True))["config"]
    assert config["name"] == MODEL_NAME
    assert config["max_batch_size"] == 8  # the server's override (ServerFactory), not the model's 32
    assert config["input"] == [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "dims": ["1"]}]
    assert config["output"][0]["dims"] == [str(len(model.labels))]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"

    await expect_error(client.get_model_metadata("no-such-model"), "StatusCode.NOT_FOUND")


async def test_infer_batches_of_photos_gives_probabilities_and_top_classes(
    client: triton_aio.InferenceServerClient, running: Running, images: dict[str, bytes]
) -> None:
    topics = ["fractions", "geometry", "exponents"]
    model = running.server.service.default_model  # type: ignore[union-attr]
    assert model is not None
    labels = list(model.labels)

    result = await client.infer(
        MODEL_NAME,
        [image_input(*(images[topic] for topic in topics))],
        outputs=[triton.InferRequestedOutput(OUTPUT_NAME)],
        request_id="req-7",
        client_timeout=30,
    )
    probabilities = result.as_numpy(OUTPUT_NAME)
    assert probabilities is not None and probabilities.shape == (3, len(labels))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert [labels[i] for i in probabilities.argmax(axis=1)] == topics
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL_NAME, MODEL_VERSION, "req-7")

    top = await client.infer(
        MODEL_NAME,
        [image_input(images["geometry"])],
        outputs=[triton.InferRequestedOutput(OUTPUT_NAME, class_count=2)],
        client_timeout=30,
    )
    classes = top.as_numpy(OUTPUT_NAME)
    assert classes is not None and classes.shape == (1, 2)
    score, index, label = classes[0][0].decode().split(":")
    assert label == "geometry" and labels[int(index)] == "geometry" and float(score) > 0.0


async def test_the_synchronous_client_works_unchanged(running: Running, images: dict[str, bytes]) -> None:
    def infer() -> np.ndarray | None:
        with triton.InferenceServerClient(running.server.target) as client:
            assert client.is_model_ready(MODEL_NAME)
            return client.infer(MODEL_NAME, [image_input(images["fractions"])], client_timeout=30).as_numpy(
                OUTPUT_NAME
            )

    probabilities = await asyncio.to_thread(infer)
    model = running.server.service.default_model  # type: ignore[union-attr]
    assert probabilities is not None and model is not None
    assert model.labels[int(probabilities[0].argmax())] == "fractions"


async def test_errors_are_status_codes_with_clear_messages(
    client: triton_aio.InferenceServerClient, images: dict[str, bytes]
) -> None:
    good = image_input(images["fractions"])
    message = await expect_error(client.infer("no-such-model", [good]), "StatusCode.NOT_FOUND")
    assert "no-such-model" in message

    wrong_name = triton.InferInput("PIXELS", [1, 1], "BYTES")
    wrong_name.set_data_from_numpy(np.array([[images["fractions"]]], dtype=np.object_))
    message = await expect_error(client.infer(MODEL_NAME, [wrong_name]), "StatusCode.INVALID_ARGUMENT")
    assert INPUT_NAME in message and "BYTES" in message

    floats = triton.InferInput(INPUT_NAME, [1, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    await expect_error(client.infer(MODEL_NAME, [floats]), "StatusCode.INVALID_ARGUMENT")

    message = await expect_error(
        client.infer(MODEL_NAME, [image_input(b"not an image")]), "StatusCode.INVALID_ARGUMENT"
    )
    assert "decodable" in message

    unknown_output = [triton.InferRequestedOutput("LOGITS")]
    await expect_error(
        client.infer(MODEL_NAME, [good], outputs=unknown_output), "StatusCode.INVALID_ARGUMENT"
    )
    # The server still serves.
    assert (await client.infer(MODEL_NAME, [good], client_timeout=30)).as_numpy(OUTPUT_NAME) is not None


async def test_events_are_published_only_for_a_named_user(
    client: triton_aio.InferenceServerClient, running: Running, images: dict[str, bytes]
) -> None:
    await client.infer(MODEL_NAME, [image_input(images["fractions"])], client_timeout=30)
    await client.infer(
        MODEL_NAME,
        [image_input(images["geometry"], images["exponents"])],
        request_id="oip-1",
        parameters={"user_id": "student-9"},
        client_timeout=30,
    )
    records = await asyncio.to_thread(read_events, running.bus, 2)
    events = [decode_image_classified(record) for record in records]
    assert sorted(event.event_id for event in events) == ["oip-1-0", "oip-1-1"]
    assert {event.user_id for event in events} == {"student-9"}
    assert [event.labels[0].label for event in sorted(events, key=lambda e: e.event_id)] == [
        "geometry",
        "exponents",
    ]
    assert (
        len(await asyncio.to_thread(read_events, running.bus, 3, 1.0)) == 2
    )  # nothing for the anonymous call


def test_bytes_tensor_encoding_round_trips_and_rejects_truncation() -> None:
    elements = [b"", b"a", b"\x00\xff" * 100]
    raw = encode_bytes_tensor(elements)
    assert parse_bytes_tensor(raw, 3) == elements
    for broken, expected in ((raw[:-1], 3), (raw[:2], 1), (raw, 2)):
        with pytest.raises(Exception, match="BYTES tensor"):
            parse_bytes_tensor(broken, expected)
