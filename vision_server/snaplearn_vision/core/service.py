"""The classification core: validate, decode, batch, predict, publish. Knows nothing of gRPC.

Per request: checks run first (cheap, with messages a client developer can act on), the
image is decoded and resized by the decode threads (off the event loop, in parallel across
requests), then the pixels join the model's DynamicBatcher, whose single model thread runs
`predict` on whole batches. The prediction is published as an ImageClassified event with a
non-blocking hand-off that can never fail the request. Image bytes are never logged and never
leave this module except towards the decoder.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from snaplearn_common import errors
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC, EncodedEvent, encode_image_classified
from snaplearn_vision.core.batcher import DynamicBatcher
from snaplearn_vision.core.metrics import (
    REJECT_DECODE_BACKLOG,
    REJECT_NOT_READY,
    REJECT_UNDECODABLE,
    VisionMetrics,
)
from snaplearn_vision.core.request_ids import RequestIds
from snaplearn_vision.runtime.decode_pool import DecodePool, decode_threads
from snaplearn_vision.runtime.ranking import ranking
from snaplearn_vision.schema import BatchingOverrides, ModelConfig

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
MAX_USER_ID_CHARS = 128
MAX_REQUEST_ID_CHARS = 128
# Model names and versions become repository paths: allow no separators or "..".
_MODEL_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LoadedModel(Protocol):
    """What the service needs of a loaded model (snaplearn_vision.runtime.engine.ImageClassifier)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def config(self) -> ModelConfig: ...

    def decode_pixels(self, image_bytes: bytes) -> np.ndarray: ...  # uint8 [H, W, C]

    def predict_pixels(self, images: Sequence[np.ndarray]) -> np.ndarray: ...  # [N, labels]

    def top_k(
        self, probabilities: np.ndarray, k: int, order: np.ndarray | None = None
    ) -> list[tuple[str, float]]: ...


class ModelSource(Protocol):
    """snaplearn_vision.server.RepositoryModels (over runtime.model_repository): load() raises NotFound."""

    def load(self, name: str, version: str | None = None) -> LoadedModel: ...


class EventSink(Protocol):
    """snaplearn_common.eventbus.publisher.EventPublisher: a non-blocking hand-off."""

    def publish(self, topic: str, event: EncodedEvent) -> Any: ...


# One image's probabilities and their ranking (label indices, most probable first).
_Scored = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's probabilities (one per label of `model`) and how they were computed."""

    probabilities: np.ndarray
    model: LoadedModel
    queue_wait_s: float
    compute_s: float  # this image's decode plus its batch's model time
    batch_size: int
    order: np.ndarray | None = None  # label indices by descending probability (runtime.ranking)


@dataclass(frozen=True, slots=True)
class ClassificationResult:
    request_id: str
    labels: tuple[tuple[str, float], ...]  # highest score first
    model_name: str
    model_version: str
    queue_wait_s: float
    compute_s: float  # this image's decode plus its batch's model time
    batch_size: int


@dataclass(slots=True)
class _Served:
    """A loaded model with its batcher."""

    model: LoadedModel
    batcher: DynamicBatcher[np.ndarray, _Scored]
    decoding: int = 0  # admitted requests still being decoded: they hold queue places too
    decode_s: float = 0.0  # moving average of one image's decode time (0 until one decoded)

    def observe_decode(self, seconds: float) -> None:
        self.decode_s = seconds if self.decode_s == 0.0 else 0.9 * self.decode_s + 0.1 * seconds

    def incoming_grace_s(self) -> float:
        """How long a due batch waits for images still decoding: about two decodes."""
        return 2.0 * self.decode_s

    @property
    def key(self) -> str:
        return f"{self.model.name}:{self.model.version}"


def _predict_batch(model: LoadedModel) -> Callable[[list[np.ndarray]], list[_Scored]]:
    """The batch function: runs on the batcher's model thread, and ranks the labels there too."""

    def predict(images: list[np.ndarray]) -> list[_Scored]:
        probabilities = model.predict_pixels(images)  # one row per image
        return list(zip(probabilities, ranking(probabilities), strict=True))

    return predict


class ClassificationService:
    """Serves Classify for the default model and any other model of the repository.

    Models other than the default are loaded on first use and kept (one batcher each);
    "latest version" is resolved on first use too, so a newer version on disk is picked
    up by a restart, not mid-flight.
    """

    def __init__(
        self,
        models: ModelSource,
        *,
        default_model_name: str,
        default_model_version: str | None,
        publisher: EventSink | None = None,
        metrics: VisionMetrics | None = None,
        batching: BatchingOverrides,
        decode_threads: int,
        decode_niceness: int,
        max_image_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
        if max_image_bytes is not None and max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {max_image_bytes}")
        self._models = models
        self.default_model_name = default_model_name
        self.default_model_version = default_model_version or None
        self._publisher = publisher
        self.metrics = metrics if metrics is not None else VisionMetrics()
        self._request_ids = RequestIds()
        self._batching = batching
        self._decode_threads = decode_threads
        self._decode_niceness = decode_niceness
        self.max_image_bytes = max_image_bytes
        self._clock = clock
        self._decode_pool: DecodePool | None = None
        # Resolved "name:version" -> served model; requested (name, version|None) -> that key.
        self._served: dict[str, _Served] = {}
        self._aliases: dict[tuple[str, str | None], str] = {}
        self._loading: dict[tuple[str, str | None], asyncio.Task[_Served]] = {}
        self._default: _Served | None = None
        self._accepting = False
        self._decoding = 0
        self._in_flight = 0
        self._idle = asyncio.Event()  # set while no classify call is in flight
        self._idle.set()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._accepting and self._default is not None

    @property
    def default_model(self) -> LoadedModel | None:
        return self._default.model if self._default is not None else None

    def batcher_for(self, model_name: str, model_version: str) -> DynamicBatcher[np.ndarray, _Scored] | None:
        served = self._served.get(f"{model_name}:{model_version}")
        return served.batcher if served is not None else None

    async def start(self) -> None:
        """Load the default model (in a thread: it reads files and warms up torch), then accept."""
        self._decode_pool = decode_threads(self._decode_threads, self._decode_niceness)
        self._decode_pool.start()
        self._accepting = True
        try:
            self._default = await self._served_model(self.default_model_name, self.default_model_version)
        except BaseException:
            self._accepting = False
            raise
        log.info(
            "default model %s loaded (labels: %d, batching: %s)",
            self._default.key,
            len(self._default.model.labels),
            self._default.batcher.limits,
        )

    async def stop(self, drain: bool = True) -> None:
        """Refuse new requests; finish (drain=True) or fail what is in flight; stop every thread.

        Draining waits for every classify call already admitted (decoding, queued or
        computing) before the batchers stop, so none of them is cut off half-way.
        """
        self._accepting = False
        for task in list(self._loading.values()):
            task.cancel()
        if drain:
            await self._idle.wait()
        await asyncio.gather(*(served.batcher.stop(drain) for served in self._served.values()))
        if self._decode_pool is not None:
            pool, self._decode_pool = self._decode_pool, None
            await pool.stop(drain)

    # -- serving ---------------------------------------------------------------------------

    async def classify(
        self,
        user_id: str,
        image_bytes: bytes,
        top_k: int = 0,
        model_name: str = "",
        model_version: str = "",
        request_id: str = "",
        deadline: float | None = None,
    ) -> ClassificationResult:
        """Classify one image and publish the prediction.

        deadline: absolute time on time.monotonic()'s clock; None means no deadline.
        Raises InvalidInput, NotFound, Overloaded, DeadlineExpired or Unavailable.
        """
        self._validate_user(user_id, request_id)
        self._validate_image(image_bytes)
        if not self.ready:
            self.metrics.count_rejection(REJECT_NOT_READY)
            raise errors.Unavailable("the vision server is starting or shutting down; retry shortly")
        served = await self._resolve(model_name, model_version)
        k = self._validated_top_k(top_k, served.model)
        prediction = await self.predict(image_bytes, model_name, model_version, deadline)
        model = prediction.model
        labels = tuple(model.top_k(prediction.probabilities, k, prediction.order))
        event_id = request_id or self._request_ids.next()
        self._publish(event_id, user_id, model, labels)
        return ClassificationResult(
            request_id=event_id,
            labels=labels,
            model_name=model.name,
            model_version=model.version,
            queue_wait_s=prediction.queue_wait_s,
            compute_s=prediction.compute_s,
            batch_size=prediction.batch_size,
        )

    def publish_prediction(
        self, user_id: str, request_id: str, prediction: Prediction, top_k: int = 0
    ) -> str:
        """Publish a prediction made by `predict` as an ImageClassified event; returns its event id.

        For edges (the Open Inference Protocol) whose callers may name a user.
        """
        self._validate_user(user_id, request_id)
        k = self._validated_top_k(top_k, prediction.model)
        event_id = request_id or self._request_ids.next()
        labels = prediction.model.top_k(prediction.probabilities, k, prediction.order)
        self._publish(event_id, user_id, prediction.model, labels)
        return event_id

    async def predict(
        self,
        image_bytes: bytes,
        model_name: str = "",
        model_version: str = "",
        deadline: float | None = None,
    ) -> Prediction:
        """One image's probabilities, without publishing anything. Raises like classify."""
        self.metrics.in_flight.inc()
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._predict(image_bytes, model_name, model_version, deadline)
        finally:
            self.metrics.in_flight.dec()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def served_model(self, model_name: str = "", model_version: str = "") -> LoadedModel:
        """The model a request naming these would be served by (loading it on first use)."""
        if not self.ready:
            self.metrics.count_rejection(REJECT_NOT_READY)
            raise errors.Unavailable("the vision server is starting or shutting down; retry shortly")
        return (await self._resolve(model_name, model_version)).model

    def loaded_model(self, model_name: str = "", model_version: str = "") -> LoadedModel | None:
        """The model if it is loaded now (no loading); "" names the default model / latest version."""
        if not self.ready:
            return None
        if not model_name:
            return None if model_version else self.default_model
        key = self._aliases.get((model_name, model_version or None))
        if key is None and model_version:
            key = f"{model_name}:{model_version}"
        served = self._served.get(key) if key is not None else None
        return served.model if served is not None else None

    async def _predict(
        self, image_bytes: bytes, model_name: str, model_version: str, deadline: float | None
    ) -> Prediction:
        arrived_at = time.monotonic()  # the batcher's clock: its delay counts from here
        self._validate_image(image_bytes)
        if not self.ready:
            self.metrics.count_rejection(REJECT_NOT_READY)
            raise errors.Unavailable("the vision server is starting or shutting down; retry shortly")
        served = await self._resolve(model_name, model_version)
        model = served.model
        self._check_deadline(deadline, "before decoding")
        batcher = served.batcher
        # Refuse before spending a decode on a request the queue cannot take; the requests
        # decoding now count, or a burst would all pass this check and be refused after decoding.
        batcher.check_capacity(deadline, incoming=served.decoding)
        served.decoding += 1
        try:
            pixels, decode_s = await self._decode(model, image_bytes)
            served.observe_decode(decode_s)
        finally:
            served.decoding -= 1
        batched = await batcher.submit(pixels, deadline=deadline, arrived_at=arrived_at)
        probabilities, order = batched.value
        return Prediction(
            probabilities=probabilities,
            model=model,
            queue_wait_s=batched.queue_wait_s,
            compute_s=decode_s + batched.compute_s,
            batch_size=batched.batch_size,
            order=order,
        )

    # -- steps -----------------------------------------------------------------------------

    def _validate_user(self, user_id: str, request_id: str) -> None:
        if not user_id or not user_id.strip():
            raise errors.InvalidInput("user_id is required (an opaque, stable id of the student)")
        if len(user_id) > MAX_USER_ID_CHARS:
            raise errors.InvalidInput(
                f"user_id is {len(user_id)} characters; the limit is {MAX_USER_ID_CHARS}"
            )
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise errors.InvalidInput(
                f"request_id is {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
            )

    def _validate_image(self, image_bytes: bytes) -> None:
        if not image_bytes:
            raise errors.InvalidInput("image is empty: send the encoded photo (JPEG, PNG, WebP or BMP)")
        if self.max_image_bytes is not None and len(image_bytes) > self.max_image_bytes:
            raise errors.InvalidInput(
                f"image is {len(image_bytes)} bytes; the limit is {self.max_image_bytes} bytes "
                "(downscale the photo before sending)"
            )

    @staticmethod
    def _validated_top_k(top_k: int, model: LoadedModel) -> int:
        label_count = len(model.labels)
        if top_k < 0:
            raise errors.InvalidInput(f"top_k must be >= 0 (0 means {DEFAULT_TOP_K}), got {top_k}")
        if top_k == 0:
            return min(DEFAULT_TOP_K, label_count)
        if top_k > label_count:
            raise errors.InvalidInput(
                f"top_k is {top_k} but model {model.name}:{model.version} has only {label_count} labels"
            )
        return top_k

    def _check_deadline(self, deadline: float | None, when: str) -> None:
        if deadline is not None and deadline <= self._clock():
            self.metrics.count_rejection("deadline_expired")
            raise errors.DeadlineExpired(f"the request's deadline passed {when}")

    async def _decode(self, model: LoadedModel, image_bytes: bytes) -> tuple[np.ndarray, float]:
        if self._decode_pool is None:
            raise errors.Unavailable("the vision server is shutting down; retry shortly")
        # The decode pool's own queue is unbounded: bound the backlog here.
        if self._decoding >= self._batching.max_queue_size:
            self.metrics.count_rejection(REJECT_DECODE_BACKLOG)
            raise errors.Overloaded(
                f"server overloaded: {self._decoding} images are waiting to be decoded; retry with backoff"
            )
        self._decoding += 1
        self.metrics.decoding.set(self._decoding)
        try:
            pixels, decode_s = await self._decode_pool.run((model, image_bytes))
        except errors.SnapLearnError:
            raise
        except Exception as exc:
            # The decoder promises InvalidInput for bad images, but image libraries raise many
            # other types on hostile bytes (KeyError, struct.error, ...): the client still sent
            # an image we cannot read. The traceback is logged (never the bytes) so that a
            # decoder bug hitting good images shows up in the logs and the counter.
            self.metrics.count_rejection(REJECT_UNDECODABLE)
            kind = type(exc).__name__
            log.warning("decoder raised %s instead of InvalidInput", kind, exc_info=True)
            raise errors.InvalidInput(
                f"image could not be decoded ({kind}); send a JPEG, PNG, WebP or BMP photo"
            ) from None
        finally:
            self._decoding -= 1
            self.metrics.decoding.set(self._decoding)
        self.metrics.decode.observe(decode_s)
        return pixels, decode_s

    def _publish(
        self, event_id: str, user_id: str, model: LoadedModel, labels: Sequence[tuple[str, float]]
    ) -> None:
        """Hand the event to the publisher; whatever happens, the request has its answer."""
        if self._publisher is None:
            return
        try:
            event = encode_image_classified(
                event_id=event_id,
                user_id=user_id,
                time_s=time.time(),
                model_name=model.name,
                model_version=model.version,
                labels=labels,
            )
            accepted = self._publisher.publish(IMAGE_CLASSIFIED_TOPIC, event)
        except Exception:
            self.metrics.publish_failures.inc()
            log.warning(
                "could not publish ImageClassified %s; the request still succeeds", event_id, exc_info=True
            )
            return
        if accepted is False:  # the publisher's buffer was full and it dropped the event
            self.metrics.publish_failures.inc()
            log.warning("publisher dropped ImageClassified %s (buffer full)", event_id)

    # -- models ----------------------------------------------------------------------------

    async def _resolve(self, model_name: str, model_version: str) -> _Served:
        if not model_name:
            if model_version:
                raise errors.InvalidInput("model_version was given without model_name")
            assert self._default is not None
            return self._default
        for field_name, value in (("model_name", model_name), ("model_version", model_version)):
            if value and not _MODEL_REF.fullmatch(value):
                raise errors.InvalidInput(
                    f"{field_name} {value[:64]!r} is not valid: use letters, digits, '.', '_' or '-' "
                    "(at most 128 characters)"
                )
        return await self._served_model(model_name, model_version or None)

    async def _served_model(self, name: str, version: str | None) -> _Served:
        requested = (name, version)
        key = self._aliases.get(requested)
        if key is not None:
            return self._served[key]
        task = self._loading.get(requested)
        if task is None:
            # One load per model however many requests ask for it at once.
            task = asyncio.get_running_loop().create_task(self._load(name, version))
            self._loading[requested] = task
            task.add_done_callback(lambda _: self._loading.pop(requested, None))
        # shield: a caller that goes away must not cancel the load others are waiting for.
        return await asyncio.shield(task)

    def _load_and_warm_up(self, name: str, version: str | None) -> LoadedModel:
        model: LoadedModel = self._models.load(name, version)
        warm_up = getattr(model, "warm_up", None)
        if callable(warm_up):
            warm_up()  # the first request should not pay for torch's lazy initialisation
        return model

    async def _load(self, name: str, version: str | None) -> _Served:
        started = time.perf_counter()
        model = await asyncio.to_thread(self._load_and_warm_up, name, version)
        key = f"{model.name}:{model.version}"
        served = self._served.get(key)
        if served is None:
            if not self._accepting:
                raise errors.Unavailable("the vision server is shutting down")
            limits = self._batching.limits_for(model.config.batching)
            holder: list[_Served] = []  # the batcher asks how many of this model's images decode
            batcher: DynamicBatcher[np.ndarray, _Scored] = DynamicBatcher(
                _predict_batch(model),
                limits,
                name=f"model {key}",
                metrics=self.metrics.for_model(key, limits.max_batch_size, limits.max_queue_size),
                incoming=lambda: holder[0].decoding if holder else 0,
                incoming_grace_s=lambda: holder[0].incoming_grace_s() if holder else 0.0,
            )
            served = _Served(model=model, batcher=batcher)
            holder.append(served)
            batcher.start()
            self._served[key] = served
            log.info("loaded model %s in %.2fs", key, time.perf_counter() - started)
        self._aliases[(name, version)] = key
        return served
