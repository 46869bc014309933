"""ClassifyStream with tokens on, straight to the real server (no gateway): a stream is admitted
once, then each item is checked as its own Classify call would be (edges/stream.py through the
security interceptor's ItemChecks): another tenant's student and an item past the caller's rate
limit are refused as that item only, and the stream goes on to end OK."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from grpc import aio

from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_common.security.settings import SecuritySettings
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import (
    ServerFactory,
    correctly_classified_images,
    request,
    server_factory,  # noqa: F401 (fixture)
)
from tests.integration.test_classify_stream import CODES, item, read_results

# One token for the stream's admission, then one per item: 4 items pass, the 5th is refused.
BURST = 5


async def test_each_item_is_judged_as_its_callers_call_and_a_refusal_ends_only_that_item(
    server_factory: ServerFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps({"school-a-token": {"subject": "app-a", "scope": "classify", "tenants": ["school-a"]}})
    )
    security = SecuritySettings.from_env(
        {}, auth_tokens_file=tokens, rate_limit_per_s=0.001, rate_limit_burst=BURST
    )
    running = await server_factory.start(security=security)
    photo = correctly_classified_images(server_factory.model_root)["fractions"]
    async with aio.insecure_channel(running.server.target) as channel:
        call = vision_pb2_grpc.VisionServiceStub(channel).ClassifyStream(
            metadata=(("authorization", "Bearer school-a-token"),), timeout=60
        )
        users = ["school-a/1", "school-b/1", "school-a/2", "school-a/3", "school-a/4", "school-a/5"]
        for item_id, user in enumerate(users, start=1):
            await call.write(
                vision_pb2.ClassifyStreamRequest(items=[item(item_id, request(photo, user=user))])
            )
        results = await read_results(call, len(users))
        await call.done_writing()
        assert await call.read() is aio.EOF
        assert await call.code() == grpc.StatusCode.OK, await call.details()
    codes = {item_id: CODES[result.code] for item_id, result in results.items()}
    assert codes == {
        1: grpc.StatusCode.OK,
        2: grpc.StatusCode.PERMISSION_DENIED,  # another school's student: refused before the bucket
        3: grpc.StatusCode.OK,
        4: grpc.StatusCode.OK,
        5: grpc.StatusCode.OK,
        6: grpc.StatusCode.RESOURCE_EXHAUSTED,  # the caller's bucket: admission + 4 items
    }, {i: r.message for i, r in results.items()}
    assert "school-b/1" in results[2].message
    assert "rate limit" in results[6].message
    assert results[1].response.labels[0].label == "fractions"
