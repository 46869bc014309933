"""Fuzzing each servicer's request handling against real servers: any field values -> an allowed status.

Hypothesis builds Classify, ClassifyStream, ModelInfer, Recommend, SimilarItems and RecordFeedback
requests from arbitrary field values (any text, any integer in the field's range, NaN and infinite
floats, Timestamps out of range, enum numbers the proto does not declare, images random, broken or
mutated from the corpus) and also sends arbitrary bytes as the request. The servers (vision with
the small trained model, recommender with the sample catalog) run on port 0 in a loop of their
own; the test calls them through plain synchronous stubs. No answer may be INTERNAL or UNKNOWN or
show a server path, and a stream must answer each item once and end. CI runs a few derandomized
examples per RPC; scripts/fuzz.py runs many.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, given
from hypothesis import strategies as st

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_oip import grpc_service_pb2 as oip
from snaplearn_oip import grpc_service_pb2_grpc as oip_grpc
from snaplearn_recommender.trainer import TrainerApp
from tests.helpers.recommender import in_process_settings
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import ServerFactory
from tests.hostile.fuzz import EXAMPLES_ENV, InThread, fuzz_settings, image_bytes, mostly_valid_images

# The long run (scripts/fuzz.py) takes as long as its examples need.
pytestmark = [
    pytest.mark.timeout(0 if os.environ.get(EXAMPLES_ENV) else 600),
    pytest.mark.filterwarnings("ignore::UserWarning:PIL"),  # corrupt EXIF/TIFF tags: expected
]

CALL_TIMEOUT_S = 20.0
MODEL = "worksheet-topics"
ITEM = "addition-001"
S = grpc.StatusCode
REFUSALS = {S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.OUT_OF_RANGE, S.RESOURCE_EXHAUSTED}
ALLOWED = {S.OK} | REFUSALS
ALLOWED_ITEM = ALLOWED | {S.CANCELLED, S.DEADLINE_EXCEEDED}  # a cancelled id, a tiny timeout_ms

uint32 = st.integers(0, 2**32 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
# Mostly valid ids, so that most examples get past validation into decoding, batching and publishing.
ids = st.one_of(
    st.just("student-1"),
    st.text(min_size=1, max_size=40),
    st.text(max_size=40),
    st.text(min_size=120, max_size=200),
)
doubles = st.floats(allow_nan=True, allow_infinity=True)


@dataclass
class Targets:
    vision: grpc.Channel
    recommender: grpc.Channel
    paths: tuple[str, ...]


@pytest.fixture(scope="module")
def targets(
    trained_model_repository: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Targets]:
    tmp = tmp_path_factory.mktemp("fuzz")
    loop = InThread.start()
    factory = ServerFactory(Path(trained_model_repository), tmp)
    bus = SqliteEventBus(tmp / "recommender-bus.db")

    async def start() -> tuple[str, Any]:
        running = await factory.start(max_image_bytes=256 * 1024)
        app = await TrainerApp.start(in_process_settings(tmp / "checkpoints"), bus)
        return running.server.target, app

    vision_target, app = loop.run(start())
    vision = grpc.insecure_channel(vision_target)
    recommender = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Targets(vision, recommender, (str(trained_model_repository), str(tmp)))
        for channel in (vision, recommender):  # the fuzzing left both serving
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        vision.close()
        recommender.close()

        async def stop() -> None:
            await app.stop()
            await factory.close()

        loop.run(stop())
        bus.close()
        loop.stop()


def answer(
    targets: Targets, call: Any, request: Any, allowed: set[grpc.StatusCode] = ALLOWED
) -> grpc.StatusCode:
    try:
        call(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code in allowed, f"{code.name}: {details!r} for {request!r:.600}"
        assert not any(path in details for path in targets.paths), details
        event(code.name)  # --hypothesis-show-statistics: how deep the examples got
        return code
    event("OK")
    return S.OK


# -- strategies ----------------------------------------------------------------------------------------


def classify_requests() -> st.SearchStrategy[vision_pb2.ClassifyRequest]:
    return st.builds(
        vision_pb2.ClassifyRequest,
        user_id=ids,
        image=mostly_valid_images(),
        top_k=st.one_of(st.integers(0, 12), st.integers(0, 12), uint32),
        model_name=st.one_of(st.just(""), st.just(MODEL), st.just(MODEL), st.text(max_size=30)),
        model_version=st.one_of(st.just(""), st.just(""), st.just("1"), st.text(max_size=10)),
        request_id=st.one_of(st.just(""), st.just(""), st.text(max_size=200)),
    )


@st.composite
def infer_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(
        model_name=draw(st.one_of(st.just(MODEL), st.text(max_size=20))),
        model_version=draw(st.one_of(st.just(""), st.just("1"), st.text(max_size=6))),
        id=draw(st.text(max_size=20)),
    )
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.one_of(st.just("IMAGE"), st.text(max_size=8))),
            datatype=draw(st.sampled_from(["BYTES", "FP32", "UINT8", "INT64", "", "bytes"])),
            shape=draw(st.lists(st.one_of(st.integers(-2, 4), int64), max_size=3)),
        )
        if draw(st.booleans()):
            tensor.contents.bytes_contents.extend(draw(st.lists(image_bytes(), max_size=3)))
    for _ in range(draw(st.integers(0, 2))):
        request.raw_input_contents.append(draw(st.one_of(st.binary(max_size=64), image_bytes())))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.one_of(st.just("PROBABILITIES"), st.text(max_size=8))))
        if draw(st.booleans()):
            output.parameters["classification"].CopyFrom(draw(parameters()))
    if draw(st.booleans()):
        request.parameters["user_id"].CopyFrom(draw(parameters()))
    return request


@st.composite
def well_formed_infer_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    """Requests a client would send, with their values fuzzed: these reach decoding and batching."""
    images = draw(st.lists(mostly_valid_images(), min_size=1, max_size=4))
    request = oip.ModelInferRequest(model_name=MODEL, model_version=draw(st.sampled_from(["", "1"])))
    tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(images), 1])
    if draw(st.booleans()):
        request.raw_input_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in images))
    else:
        tensor.contents.bytes_contents.extend(images)
    if draw(st.booleans()):
        output = request.outputs.add(name="PROBABILITIES")
        output.parameters["classification"].int64_param = draw(st.integers(-1, 12))
    if draw(st.booleans()):
        request.parameters["user_id"].string_param = draw(ids)
    return request


def parameters() -> st.SearchStrategy[oip.InferParameter]:
    return st.one_of(
        st.builds(oip.InferParameter, int64_param=int64),
        st.builds(oip.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
        st.builds(oip.InferParameter, string_param=st.text(max_size=150)),
        st.builds(oip.InferParameter, bool_param=st.booleans()),
        st.builds(oip.InferParameter, double_param=doubles),
        st.just(oip.InferParameter()),
    )


def filters() -> st.SearchStrategy[recommender_pb2.RecommendFilters]:
    feature = st.builds(
        recommender_pb2.FeatureFilter,
        name=st.one_of(st.sampled_from(["difficulty", "grade", "format", "concepts"]), st.text(max_size=10)),
        values=st.lists(
            st.one_of(st.text(max_size=10), st.sampled_from(["1", "worksheet", "nan", "inf"])), max_size=3
        ),
        min=st.one_of(st.none(), doubles),
        max=st.one_of(st.none(), doubles),
    )
    known = st.builds(
        recommender_pb2.RecommendFilters,
        grades=st.lists(st.integers(0, 12), max_size=2),
        formats=st.lists(st.sampled_from(["worksheet", "video", "lesson", "quiz", "game"]), max_size=2),
        concepts=st.lists(st.sampled_from(["fractions", "addition", "geometry"]), max_size=2),
    )
    return st.one_of(
        st.just(recommender_pb2.RecommendFilters()),
        known,
        st.builds(
            recommender_pb2.RecommendFilters,
            grades=st.lists(uint32, max_size=3),
            formats=st.lists(
                st.one_of(st.sampled_from(["worksheet", "video"]), st.text(max_size=10)), max_size=3
            ),
            concepts=st.lists(
                st.one_of(st.sampled_from(["fractions", "addition"]), st.text(max_size=10)), max_size=3
            ),
            features=st.lists(feature, max_size=2),
        ),
    )


@st.composite
def feedback_requests(draw: st.DrawFn) -> recommender_pb2.RecordFeedbackRequest:
    request = recommender_pb2.RecordFeedbackRequest(
        user_id=draw(ids),
        item_id=draw(st.one_of(st.just(ITEM), st.text(max_size=200))),
        # proto3 enums are open: undeclared numbers arrive as they are.
        kind=cast(Any, draw(st.integers(-3, 6))),
        request_id=draw(st.one_of(st.just(""), st.text(max_size=200))),
    )
    if draw(st.booleans()):
        # The Python API checks nothing here; the wire carries any int64 / int32.
        request.time.seconds = draw(st.one_of(st.integers(-(2**35), 2**35), int64))
        request.time.nanos = draw(st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1)))
    return request


# -- the properties ------------------------------------------------------------------------------------


@fuzz_settings(ci_examples=40)
@given(request=classify_requests())
def test_classify(targets: Targets, request: vision_pb2.ClassifyRequest) -> None:
    answer(targets, vision_pb2_grpc.VisionServiceStub(targets.vision).Classify, request)


@fuzz_settings(ci_examples=40)
@given(request=st.one_of(well_formed_infer_requests(), infer_requests()))
def test_model_infer(targets: Targets, request: oip.ModelInferRequest) -> None:
    answer(targets, oip_grpc.GRPCInferenceServiceStub(targets.vision).ModelInfer, request)


@fuzz_settings(ci_examples=40)
@given(
    request=st.builds(
        recommender_pb2.RecommendRequest,
        user_id=ids,
        k=st.one_of(st.integers(0, 50), uint32),
        exclude_seen=st.booleans(),
        filters=filters(),
    )
)
def test_recommend(targets: Targets, request: recommender_pb2.RecommendRequest) -> None:
    answer(targets, recommender_pb2_grpc.RecommenderServiceStub(targets.recommender).Recommend, request)


@fuzz_settings(ci_examples=40)
@given(
    request=st.builds(
        recommender_pb2.SimilarItemsRequest,
        item_id=st.one_of(st.just(ITEM), st.text(max_size=200)),
        k=st.one_of(st.integers(0, 50), uint32),
        filters=filters(),
    )
)
def test_similar_items(targets: Targets, request: recommender_pb2.SimilarItemsRequest) -> None:
    answer(targets, recommender_pb2_grpc.RecommenderServiceStub(targets.recommender).SimilarItems, request)


@fuzz_settings(ci_examples=40)
@given(request=feedback_requests())
def test_record_feedback(targets: Targets, request: recommender_pb2.RecordFeedbackRequest) -> None:
    answer(targets, recommender_pb2_grpc.RecommenderServiceStub(targets.recommender).RecordFeedback, request)


METHODS = [
    "/snaplearn.vision.v1.VisionService/Classify",
    "/inference.GRPCInferenceService/ModelInfer",
    "/snaplearn.recommender.v1.RecommenderService/Recommend",
    "/snaplearn.recommender.v1.RecommenderService/SimilarItems",
    "/snaplearn.recommender.v1.RecommenderService/RecordFeedback",
]


@fuzz_settings(ci_examples=60)
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=300))
def test_arbitrary_bytes_as_the_request(targets: Targets, method: str, payload: bytes) -> None:
    channel = targets.recommender if ".recommender." in method else targets.vision
    answer(targets, channel.unary_unary(method), payload)


@st.composite
def stream_messages(draw: st.DrawFn) -> list[vision_pb2.ClassifyStreamRequest]:
    messages = []
    next_id = draw(st.integers(0, 3))
    for _ in range(draw(st.integers(0, 3))):
        message = vision_pb2.ClassifyStreamRequest()
        for _ in range(draw(st.integers(0, 3))):
            item_id = next_id if draw(st.integers(0, 4)) else draw(st.integers(0, 2**64 - 1))
            next_id += 1
            message.items.add(
                id=item_id,
                request=draw(classify_requests()),
                timeout_ms=draw(st.one_of(st.floats(1.0, 20_000.0), doubles)),
            )
        message.cancel_ids.extend(draw(st.lists(st.integers(0, next_id + 1), max_size=3)))
        messages.append(message)
    return messages


@fuzz_settings(ci_examples=30)
@given(messages=stream_messages())
def test_classify_stream_answers_every_item_once_and_ends(
    targets: Targets, messages: list[vision_pb2.ClassifyStreamRequest]
) -> None:
    sent: dict[int, int] = {}
    for message in messages:
        for item in message.items:
            sent[item.id] = sent.get(item.id, 0) + 1
    call = vision_pb2_grpc.VisionServiceStub(targets.vision).ClassifyStream(
        iter(messages), timeout=CALL_TIMEOUT_S
    )
    answered: dict[int, int] = {}
    try:
        for response in call:
            for result in response.results:
                code = next(c for c in S if c.value[0] == result.code)
                assert code in ALLOWED_ITEM, f"item {result.id}: {code.name} {result.message!r}"
                answered[result.id] = answered.get(result.id, 0) + 1
    except grpc.RpcError as error:
        assert error.code() != S.DEADLINE_EXCEEDED, f"the stream never ended; answered {answered} of {sent}"
        assert error.code() in REFUSALS, f"{error.code().name}: {error.details()!r}"
        return
    # Every item is answered exactly once (a cancelled one as CANCELLED), duplicates of a live id too.
    assert answered == sent, f"answered {answered}, sent {sent}"


# Names a caller could use to reach outside the model repository, or to confuse a path join.
PATHISH = st.sampled_from(["..", "../..", "/etc", "a/b", f"{MODEL}/../x", "x\x00y", ".", "~", "CON", " "])
names = st.one_of(PATHISH, st.text(max_size=30), st.just(MODEL))
versions = st.one_of(st.just(""), st.just("1"), PATHISH, st.text(max_size=8))


@fuzz_settings(ci_examples=40)
@given(
    method=st.sampled_from(["ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"]),
    name=names,
    version=versions,
)
def test_model_metadata_rpcs(targets: Targets, method: str, name: str, version: str) -> None:
    request = getattr(oip, f"{method}Request")(name=name, version=version)
    answer(targets, getattr(oip_grpc.GRPCInferenceServiceStub(targets.vision), method), request)


@fuzz_settings(ci_examples=40)
@given(
    method=st.sampled_from(["RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"]),
    repository=st.one_of(st.just(""), st.text(max_size=10)),
    # Never the served model: unloading it would leave the other properties only NOT_FOUND to see.
    name=st.one_of(PATHISH, st.text(max_size=30).filter(lambda name: name != MODEL)),
    parameter=st.one_of(st.none(), st.text(max_size=10)),
)
def test_model_repository_rpcs(
    targets: Targets, method: str, repository: str, name: str, parameter: str | None
) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(targets.vision)
    if method == "RepositoryIndex":
        request: Any = oip.RepositoryIndexRequest(repository_name=repository, ready=bool(parameter))
    else:
        request = getattr(oip, f"{method}Request")(repository_name=repository, model_name=name)
        if parameter is not None:
            request.parameters[parameter].CopyFrom(oip.ModelRepositoryParameter(bool_param=True))
    answer(targets, getattr(stub, method), request)
