"""The Open Inference Protocol (KServe v2) edge of the vision server, beside our own API.

Standard clients (tritonclient, perf_analyzer, KServe tooling) drive SnapLearn unchanged:

    input   IMAGE          BYTES  [batch, 1]       encoded photos (JPEG, PNG, WebP, ...)
    output  PROBABILITIES  FP32   [batch, labels]  softmax over the model's labels; with the
                                                   output parameter classification=k instead
                                                   BYTES [batch, k] "score:index:label", best first

Each image of a request joins the model's dynamic batcher on its own (batched with everyone
else's), so a client's batch and the server's batches are independent. ModelInfer goes through
the edge wrapper (edges.call) as Classify does; the other methods' domain errors are mapped to
status codes by the shared interceptor. A request
parameter user_id (string) publishes each prediction as an ImageClassified event, as
Classify does; without it nothing is published.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import numpy as np
from grpc import aio

from snaplearn_common import errors
from snaplearn_oip import grpc_service_pb2 as oip
from snaplearn_oip import grpc_service_pb2_grpc as oip_grpc
from snaplearn_vision.core.service import ClassificationService, LoadedModel, Prediction
from snaplearn_vision.edges.call import (
    Failed,
    observed,
    reply_failed,
    retry_after_ms,
    set_retry_pushback,
    unary_deadline,
)

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"
_EMPTY_INFER_RESPONSE = oip.ModelInferResponse()
SERVER_NAME = "snaplearn-vision"
INPUT_NAME = "IMAGE"
OUTPUT_NAME = "PROBABILITIES"
CLASSIFICATION_PARAMETER = "classification"
USER_PARAMETER = "user_id"
PLATFORM = "pytorch_libtorch"
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
# Triton's RepositoryModelUnload parameter: SnapLearn has no ensembles, so nothing depends on a model.
UNLOAD_DEPENDENTS_PARAMETER = "unload_dependents"
# The most images one ModelInfer may carry (each still waits its turn in the batcher).
MAX_IMAGES_PER_REQUEST = 256
_LENGTH = struct.Struct("<I")


def _server_version() -> str:
    try:
        return metadata.version("snaplearn-vision")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def parse_bytes_tensor(raw: bytes, expected: int) -> list[bytes]:
    """The OIP raw BYTES encoding (4-byte little-endian length, then the bytes, per element)."""
    elements: list[bytes] = []
    offset, end = 0, len(raw)
    view = memoryview(raw)
    while offset < end:
        if offset + 4 > end:
            raise errors.InvalidInput("BYTES tensor is truncated: a length prefix is cut off")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise errors.InvalidInput(
                f"BYTES tensor is truncated: element {len(elements)} declares {length} bytes"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != expected:
        raise errors.InvalidInput(f"BYTES tensor holds {len(elements)} elements; its shape says {expected}")
    return elements


def encode_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: ClassificationService) -> None:
        self._service = service
        self._server_version = _server_version()

    # -- health and metadata ---------------------------------------------------------------

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._service.ready)

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        # Ready means loaded: asking does not load a model (ModelMetadata or ModelInfer do).
        if not request.name:
            return oip.ModelReadyResponse(ready=False)
        model = self._service.loaded_model(request.name, self._version(request.name, request.version))
        return oip.ModelReadyResponse(ready=model is not None)

    # -- model repository extension ----------------------------------------------------------

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: aio.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        _check_repository(request.repository_name)
        # On the loop: it reads the service's own tables, which only the loop changes (a listing is cheap).
        rows = self._service.repository_index(request.ready)
        index = oip.RepositoryIndexResponse.ModelIndex
        return oip.RepositoryIndexResponse(
            models=[index(name=r.name, version=r.version, state=r.state, reason=r.reason) for r in rows]
        )

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: aio.ServicerContext
    ) -> oip.RepositoryModelLoadResponse:
        _check_repository(request.repository_name)
        if request.parameters:
            raise errors.InvalidInput(
                f"RepositoryModelLoad parameters ({', '.join(sorted(request.parameters))}) are not "
                "supported: add a version with `snaplearn-vision models add`, then load the model by name"
            )
        await self._service.load_model(request.model_name)
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: aio.ServicerContext
    ) -> oip.RepositoryModelUnloadResponse:
        _check_repository(request.repository_name)
        unknown = sorted(set(request.parameters) - {UNLOAD_DEPENDENTS_PARAMETER})
        if unknown:
            raise errors.InvalidInput(
                f"RepositoryModelUnload parameters {unknown} are not supported "
                f"(only {UNLOAD_DEPENDENTS_PARAMETER})"
            )
        await self._service.unload_model(request.model_name)
        return oip.RepositoryModelUnloadResponse()

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=self._server_version, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        model = await self._model(request.name, request.version, context)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype="BYTES", shape=[-1, 1])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, len(model.labels)])],
        )

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        model = await self._model(request.name, request.version, context)
        batcher = self._service.batcher_for(model.name, model.version)
        assert batcher is not None, "a served model always has a batcher"
        limits = batcher.limits
        device = getattr(model, "device", None)
        on_gpu = getattr(device, "type", "cpu") == "cuda"
        return oip.ModelConfigResponse(
            config=oip.ModelConfig(
                name=model.name,
                platform=PLATFORM,
                backend="pytorch",
                max_batch_size=limits.max_batch_size,
                input=[oip.ModelInput(name=INPUT_NAME, data_type=oip.TYPE_STRING, dims=[1])],
                output=[oip.ModelOutput(name=OUTPUT_NAME, data_type=oip.TYPE_FP32, dims=[len(model.labels)])],
                instance_group=[
                    oip.ModelInstanceGroup(
                        count=1,
                        kind=oip.ModelInstanceGroup.KIND_GPU if on_gpu else oip.ModelInstanceGroup.KIND_CPU,
                    )
                ],
                dynamic_batching=oip.ModelDynamicBatching(
                    max_queue_delay_microseconds=round(limits.max_queue_delay_s * 1_000_000)
                ),
                model_transaction_policy=oip.ModelTransactionPolicy(decoupled=False),
            )
        )

    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: aio.ServicerContext
    ) -> oip.ModelStatisticsResponse:
        models = [await self._model(request.name, request.version, context)] if request.name else []
        if not request.name and self._service.default_model is not None:
            models = [self._service.default_model]
        response = oip.ModelStatisticsResponse()
        for model in models:
            batcher = self._service.batcher_for(model.name, model.version)
            if batcher is None:
                continue
            stats = batcher.stats
            compute_s = stats.total_latency_s - stats.total_queue_wait_s
            duration = oip.StatisticDuration
            response.model_stats.append(
                oip.ModelStatistics(
                    name=model.name,
                    version=model.version,
                    inference_count=stats.computed,
                    execution_count=stats.batches,
                    # Per request, as Triton counts them (perf_analyzer checks the three compute
                    # counts agree); a request's compute time is its whole batch's.
                    inference_stats=oip.InferStatistics(
                        success=duration(count=stats.computed, ns=round(stats.total_latency_s * 1e9)),
                        queue=duration(count=stats.computed, ns=round(stats.total_queue_wait_s * 1e9)),
                        compute_input=duration(count=stats.computed, ns=0),
                        compute_infer=duration(count=stats.computed, ns=round(compute_s * 1e9)),
                        compute_output=duration(count=stats.computed, ns=0),
                    ),
                )
            )
        return response

    # -- inference ---------------------------------------------------------------------------

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: aio.ServicerContext
    ) -> oip.ModelInferResponse:
        started = time.monotonic()
        deadline = unary_deadline(context, started)
        outcome = await observed(
            self._service.metrics,
            self._infer(request, deadline),
            started=started,
            deadline=deadline,
            method=_INFER_METHOD,
        )
        if isinstance(outcome, Failed):
            return reply_failed(context, outcome, _EMPTY_INFER_RESPONSE)
        return outcome

    async def _infer(self, request: oip.ModelInferRequest, deadline: float | None) -> oip.ModelInferResponse:
        if not request.model_name:
            raise errors.InvalidInput("model_name is required")
        images = self._images(request)
        outputs = self._requested_outputs(request)
        user_id = self._user_id(request)
        name = request.model_name
        version = self._version(name, request.model_version)
        if len(images) == 1:
            predictions = [await self._service.predict(images[0], name, version, deadline)]
        else:
            predictions = list(
                await asyncio.gather(
                    *(self._service.predict(image, name, version, deadline) for image in images)
                )
            )
        model = predictions[0].model
        if user_id:
            for index, prediction in enumerate(predictions):
                event_id = f"{request.id}-{index}" if request.id else ""
                self._service.publish_prediction(user_id, event_id, prediction)
        response = oip.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for output_name, classification in outputs:
            tensor, raw = self._output(output_name, classification, model, predictions)
            response.outputs.append(tensor)
            response.raw_output_contents.append(raw)
        return response

    @staticmethod
    def _images(request: oip.ModelInferRequest) -> list[bytes]:
        if len(request.inputs) != 1:
            raise errors.InvalidInput(f"expected exactly one input ({INPUT_NAME}), got {len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME or tensor.datatype != "BYTES":
            raise errors.InvalidInput(
                f"expected input {INPUT_NAME} of datatype BYTES (encoded images), "
                f"got {tensor.name!r} of datatype {tensor.datatype!r}"
            )
        shape = list(tensor.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise errors.InvalidInput(
                f"input {INPUT_NAME} must have shape [batch, 1] or [batch], got {shape}"
            )
        count = shape[0]
        if count > MAX_IMAGES_PER_REQUEST:
            raise errors.InvalidInput(f"at most {MAX_IMAGES_PER_REQUEST} images per request, got {count}")
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise errors.InvalidInput("raw_input_contents must hold exactly one entry per input")
            return parse_bytes_tensor(request.raw_input_contents[0], count)
        images = list(tensor.contents.bytes_contents)
        if len(images) != count:
            raise errors.InvalidInput(
                f"input {INPUT_NAME} holds {len(images)} elements; its shape says {count}"
            )
        return images

    @staticmethod
    def _requested_outputs(request: oip.ModelInferRequest) -> list[tuple[str, int]]:
        """(output name, classification k or 0) per requested output; all outputs when none named."""
        if not request.outputs:
            return [(OUTPUT_NAME, 0)]
        requested = []
        for output in request.outputs:
            if output.name != OUTPUT_NAME:
                raise errors.InvalidInput(f"unknown output {output.name!r}; the model has {OUTPUT_NAME}")
            k = 0
            if CLASSIFICATION_PARAMETER in output.parameters:
                parameter = output.parameters[CLASSIFICATION_PARAMETER]
                if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
                    raise errors.InvalidInput("output parameter classification must be an integer")
                k = int(getattr(parameter, parameter.WhichOneof("parameter_choice")))
                if k < 1:
                    raise errors.InvalidInput(f"classification must be >= 1, got {k}")
            requested.append((output.name, k))
        return requested

    @staticmethod
    def _user_id(request: oip.ModelInferRequest) -> str:
        if USER_PARAMETER not in request.parameters:
            return ""
        parameter = request.parameters[USER_PARAMETER]
        if parameter.WhichOneof("parameter_choice") != "string_param":
            raise errors.InvalidInput(f"parameter {USER_PARAMETER} must be a string")
        return parameter.string_param

    @staticmethod
    def _output(
        name: str, classification: int, model: LoadedModel, predictions: Sequence[Prediction]
    ) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
        tensor = oip.ModelInferResponse.InferOutputTensor
        probabilities = np.stack([prediction.probabilities for prediction in predictions]).astype("<f4")
        if not classification:
            return tensor(
                name=name, datatype="FP32", shape=list(probabilities.shape)
            ), probabilities.tobytes()
        labels = list(model.labels)
        k = min(classification, len(labels))
        elements: list[bytes] = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:k]
            elements.extend(f"{row[i]:f}:{i}:{labels[i]}".encode() for i in order)
        return tensor(name=name, datatype="BYTES", shape=[len(predictions), k]), encode_bytes_tensor(elements)

    async def _model(self, name: str, version: str, context: aio.ServicerContext) -> LoadedModel:
        if not name:
            raise errors.InvalidInput("the model name is required")
        try:
            return await self._service.served_model(name, self._version(name, version))
        except errors.Unavailable as error:
            # The shared interceptor sets the status from the error; the trailer set here stays.
            set_retry_pushback(context, retry_after_ms(error))
            raise

    def _version(self, name: str, version: str) -> str:
        """No version means the server's choice: for the default model, the version it serves."""
        if not version and name == self._service.default_model_name:
            return self._service.default_model_version or ""
        return version


def _check_repository(name: str) -> None:
    if name:
        raise errors.InvalidInput(
            f"repository_name {name[:64]!r} is not known: this server has one model repository; "
            "leave repository_name empty"
        )


def registrar(service: ClassificationService) -> Callable[[aio.Server], None]:
    """What start_grpc_server's `registrars` wants: adds GRPCInferenceService to a server."""
    servicer = OipServicer(service)

    def register(server: aio.Server) -> None:
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    return register
