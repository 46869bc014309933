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
import dataclasses
import gc
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

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
from snaplearn_vision.core.versions import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADING,
    VersionPolicy,
    VersionStatus,
)
from snaplearn_vision.runtime.decode_pool import DecodePool, decode_threads
from snaplearn_vision.runtime.ranking import ranking
from snaplearn_vision.schema import BatchingOverrides, InvalidModelConfig, ModelConfig

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
MAX_USER_ID_CHARS = 128
MAX_REQUEST_ID_CHARS = 128
# Model names and versions become repository paths: allow no separators or "..".
_MODEL_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A loading model's retry hint: what its last load took, less the time this one has run, within
# these bounds; a model never loaded here before is expected to take as long as the last model did.
_RETRY_MIN_S = 0.25
_RETRY_MAX_S = 30.0
_FIRST_LOAD_GUESS_S = 2.0


class ModelLoading(errors.Unavailable):
    """A model (or version) still loading: UNAVAILABLE, with when to try again.

    retry_after_s travels in the message and, at the gRPC edge, as the grpc-retry-pushback-ms
    trailer, which a client's retry policy (gRPC's retry design, A6) waits for.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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


def _recognised(model: LoadedModel, labels: Sequence[tuple[str, float]]) -> bool:
    """Whether the top label reaches the model's min_confidence (config.json; 0 = always)."""
    return not labels or labels[0][1] >= model.config.min_confidence


class ModelSource(Protocol):
    """snaplearn_vision.server.RepositoryModels (over runtime.model_repository): load() raises NotFound.

    A source may also have release(): called (in a thread) after a version was dropped, to give
    device memory back (the CUDA caching allocator keeps freed blocks otherwise).
    """

    def load(self, name: str, version: str | None = None) -> LoadedModel: ...


class ModelCatalog(Protocol):
    """What the repository holds, read again on every poll (snaplearn_vision.server.RepositoryCatalog)."""

    def model_names(self) -> list[str]: ...

    def versions(self, name: str) -> list[str]: ...  # [] when the repository has no such model

    def policy(self, name: str) -> VersionPolicy: ...  # raises InvalidModelConfig

    def stamp(self, name: str, version: str) -> object: ...  # changes when the version is written again

    def public_reason(self, error: BaseException) -> str: ...  # the error, without server paths


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
    # False: the top score is below the model's min_confidence (config.json), nothing published.
    recognised: bool = True


@dataclass(slots=True)
class _Served:
    """A loaded model with its batcher."""

    model: LoadedModel
    batcher: DynamicBatcher[np.ndarray, _Scored]
    decoding: int = 0  # admitted requests still being decoded: they hold queue places too
    decode_s: float = 0.0  # moving average of one image's decode time (0 until one decoded)
    users: int = 0  # calls admitted to this version and not finished: a retired version waits for them
    retired: bool = False  # dropped from serving: no new call is admitted to it
    drained: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set once retired and unused

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
    """Serves Classify for the default model and any other model of the repository, live.

    Each served version has its own batcher. The default model is loaded at start, another
    model on its first call (which waits for it) or by load_model (the repository extension).
    Every `model_poll_interval_s` the versions on disk of each loaded model are read again and
    its version policy (core.versions) applied: a new version is loaded and warmed up off the
    serving path (a thread) while the old one serves, then calls that name no version are
    pointed at it in one assignment; a version leaving the policy stops taking calls at once,
    finishes the calls admitted to it (queued or decoding), and is then stopped and released.
    A version that fails to load is kept out (state UNAVAILABLE with its reason, the metric
    snaplearn_vision_model_load_failures, an error log) and tried again only when it is
    written again or loaded explicitly; whatever served before keeps serving.
    """

    def __init__(
        self,
        models: ModelSource,
        *,
        catalog: ModelCatalog,
        model_poll_interval_s: float | None = None,
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
        if model_poll_interval_s is not None and model_poll_interval_s <= 0:
            raise ValueError(f"model_poll_interval_s must be > 0 or None, got {model_poll_interval_s}")
        self._models = models
        self._catalog = catalog
        self._poll_interval_s = model_poll_interval_s
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
        # (name, None), what a call naming no version gets, is repointed by a swap.
        self._served: dict[str, _Served] = {}
        self._aliases: dict[tuple[str, str | None], str] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}  # a model's first load, shared by its callers
        self._managed: dict[str, None] = {}  # models kept in step with the repository (ordered set)
        self._unloaded: set[str] = set()  # unloaded on request: not loaded again by a call
        self._states: dict[tuple[str, str], str] = {}  # LOADING / UNLOADING versions
        self._load_started: dict[tuple[str, str], float] = {}  # LOADING versions: since when
        self._load_seconds: dict[str, float] = {}  # each model's last load + warm-up (the retry hint)
        self._failed: dict[tuple[str, str], tuple[str, BaseException]] = {}  # (public reason, error)
        self._failed_stamps: dict[tuple[str, str], object] = {}  # what the failed version's files were
        self._problems: dict[str, str] = {}  # a model's own config (its version policy) is invalid
        self._locks: dict[str, asyncio.Lock] = {}  # one sync of a model at a time
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[str, bool], None]] = []
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
            name = self.default_model_name
            self._managed[name] = None
            await self._sync(name)
            if self._default is None:
                # The operator reads this: the original error, paths included, fails the start.
                for (failed_name, _), (_, error) in self._failed.items():
                    if failed_name == name:
                        raise error
                self._explain(name, self.default_model_version)
        except BaseException:
            self._accepting = False
            raise
        if self._poll_interval_s is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(self._poll_interval_s))
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
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for task in list(self._loading.values()):
            task.cancel()
        if drain:
            await self._idle.wait()
        await asyncio.gather(*(served.batcher.stop(drain) for served in self._served.values()))
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
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
        recognised = _recognised(model, labels)
        if recognised:  # a photo unlike anything the model knows must not steer recommendations
            self._publish(event_id, user_id, model, labels)
        return ClassificationResult(
            request_id=event_id,
            labels=labels,
            model_name=model.name,
            model_version=model.version,
            queue_wait_s=prediction.queue_wait_s,
            compute_s=prediction.compute_s,
            batch_size=prediction.batch_size,
            recognised=recognised,
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
        if _recognised(prediction.model, labels):  # below min_confidence: answered, not published
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
        served = self._lookup(model_name, model_version or None)
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
        if served.retired:  # swapped out while this call waited for a first load: take the new one
            served = await self._resolve(model_name, model_version)
        # Admitted to this version: it finishes here even if a swap happens meanwhile.
        served.users += 1
        try:
            return await self._predict_on(served, image_bytes, deadline, arrived_at)
        finally:
            served.users -= 1
            if served.users == 0 and served.retired:
                served.drained.set()

    async def _predict_on(
        self, served: _Served, image_bytes: bytes, deadline: float | None, arrived_at: float
    ) -> Prediction:
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
        served = self._lookup(name, version)
        if served is not None:
            return served
        if name in self._unloaded:
            raise errors.FailedPrecondition(
                f"model {name!r} was unloaded (RepositoryModelUnload); load it again with RepositoryModelLoad"
            )
        if name not in self._managed:
            task = self._loading.get(name)
            if task is None:
                # One first load per model however many calls ask for it at once.
                task = asyncio.get_running_loop().create_task(self._first_load(name))
                self._loading[name] = task
                task.add_done_callback(lambda _: self._loading.pop(name, None))
            # shield: a caller that goes away must not cancel the load others are waiting for.
            await asyncio.shield(task)
            served = self._lookup(name, version)
            if served is not None:
                return served
        self._explain(name, version)

    def _lookup(self, name: str, version: str | None) -> _Served | None:
        key = self._aliases.get((name, version))
        return self._served.get(key) if key is not None else None

    async def _first_load(self, name: str) -> None:
        if not await asyncio.to_thread(self._catalog.versions, name):
            return  # not in the repository: _explain says so, and the name is not remembered
        self._managed[name] = None
        await self._sync(name)

    def _explain(self, name: str, version: str | None) -> NoReturn:
        """Raise the error that says why nothing of `name` (`version`) can serve a call now."""
        on_disk = self._catalog.versions(name)
        if not on_disk and not any(key[0] == name for key in self._aliases):
            raise errors.NotFound(f"model {name!r} not found; models that can serve: {self._servable_list()}")
        serving = self._serving_versions(name)
        if version is not None:
            if self._states.get((name, version)) == LOADING:
                retry_s = self._retry_after(name, version)
                raise ModelLoading(
                    f"model {name} version {version} is loading; retry in {retry_s:.1f} s", retry_s
                )
            failed = self._failed.get((name, version))
            if failed is not None:
                raise errors.FailedPrecondition(f"model {name} version {version} failed to load: {failed[0]}")
            if version not in on_disk:
                raise errors.NotFound(
                    f"model {name!r} has no version {version!r}; versions that can serve: "
                    f"{', '.join(serving) or 'none'}"
                )
            if name in self._managed:
                raise errors.NotFound(
                    f"model {name!r} version {version!r} is not served (its version policy serves "
                    f"{self._policy_text(name)}); versions that can serve: {', '.join(serving) or 'none'}"
                )
        if any(key[0] == name and state == LOADING for key, state in self._states.items()):
            retry_s = self._retry_after(name, None)
            raise ModelLoading(f"model {name} is loading; retry in {retry_s:.1f} s", retry_s)
        if name in self._problems:
            raise errors.FailedPrecondition(f"model {name} cannot serve: {self._problems[name]}")
        failures = sorted((key[1], reason) for key, (reason, _) in self._failed.items() if key[0] == name)
        if failures:
            failed_version, reason = failures[-1]
            raise errors.FailedPrecondition(
                f"model {name} cannot serve: version {failed_version} failed to load: {reason}"
            )
        retry_s = self._retry_after(name, None)
        raise ModelLoading(f"model {name} has no version loaded yet; retry in {retry_s:.1f} s", retry_s)

    def _retry_after(self, name: str, version: str | None) -> float:
        """Seconds until `name` (`version`) should be loaded: its last load time less this one's so far."""
        started = [at for (n, v), at in self._load_started.items() if n == name and version in (None, v)]
        if name in self._load_seconds:
            expected = self._load_seconds[name]
        elif self._load_seconds:
            expected = max(self._load_seconds.values())
        else:
            expected = _FIRST_LOAD_GUESS_S
        if started:
            expected -= time.monotonic() - min(started)
        elif self._poll_interval_s is not None:
            expected = max(expected, self._poll_interval_s)  # not loading yet: the next poll starts it
        return round(min(_RETRY_MAX_S, max(_RETRY_MIN_S, expected)), 2)

    def _serving_versions(self, name: str) -> list[str]:
        versions = {served.model.version for served in self._served.values() if served.model.name == name}
        return sorted(versions, key=_version_order)

    def _servable_list(self) -> str:
        """Models a call may name: those serving, and those in the repository not known to be broken."""
        names = {served.model.name for served in self._served.values()}
        for name in self._catalog.model_names():
            if name in self._unloaded or name in self._problems:
                continue
            versions = self._catalog.versions(name)
            if any((name, version) not in self._failed for version in versions):
                names.add(name)
        return ", ".join(sorted(names)) or "none"

    def _policy(self, name: str) -> VersionPolicy:
        if name == self.default_model_name and self.default_model_version:
            return VersionPolicy(kind="specific", versions=(self.default_model_version,))
        return self._catalog.policy(name)

    def _policy_text(self, name: str) -> str:
        try:
            return self._policy(name).describe()
        except InvalidModelConfig:
            return "nothing (its version policy is invalid)"

    # -- the live repository ---------------------------------------------------------------

    def add_model_listener(self, listener: Callable[[str, bool], None]) -> None:
        """listener(model name, ready) after each change of what a model serves (health, for one)."""
        self._listeners.append(listener)

    async def refresh_models(self) -> None:
        """Bring every loaded model in step with the repository now (what each poll does)."""
        for name in list(self._managed):
            try:
                await self._sync(name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not bring model %s in step with the repository", name)

    async def load_model(self, name: str) -> None:
        """Load `name` (the versions its policy selects), or reload it; failed versions are tried again.

        Raises NotFound (not in the repository) or FailedPrecondition (no version could load).
        """
        self._check_name(name)
        if not self._accepting:
            raise errors.Unavailable("the vision server is starting or shutting down; retry shortly")
        if not await asyncio.to_thread(self._catalog.versions, name):
            self._explain(name, None)
        self._unloaded.discard(name)
        self._managed[name] = None
        for key in [key for key in self._failed if key[0] == name]:
            del self._failed[key]
        await self._sync(name)
        if self._lookup(name, None) is None:
            self._explain(name, None)

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of `name`: calls admitted finish first, then memory is released."""
        self._check_name(name)
        if name == self.default_model_name:
            raise errors.FailedPrecondition(
                f"model {name} is the server's default model (what Classify serves without model_name) "
                "and cannot be unloaded; start the server with another --model-name instead"
            )
        if name not in self._managed and not self._catalog.versions(name):
            self._explain(name, None)
        self._unloaded.add(name)
        self._managed.pop(name, None)
        async with self._lock(name):
            retiring = [
                self._retire(served) for served in list(self._served.values()) if served.model.name == name
            ]
            self._aliases = {alias: key for alias, key in self._aliases.items() if alias[0] != name}
            for key in [key for key in self._failed if key[0] == name]:
                del self._failed[key]
            self._problems.pop(name, None)
        self._notify(name)
        # shield: the unload goes on if the caller leaves; the caller hears once memory is back.
        await asyncio.shield(asyncio.gather(*retiring))

    def repository_index(self, ready_only: bool = False) -> list[VersionStatus]:
        """Every version in the repository or in memory, with its state, by model name and version."""
        names = set(self._catalog.model_names()) | {served.model.name for served in self._served.values()}
        rows: list[VersionStatus] = []
        for name in sorted(names):
            on_disk = self._catalog.versions(name)
            served = set(self._serving_versions(name))
            transient = {key[1]: state for key, state in self._states.items() if key[0] == name}
            try:
                wanted = set(self._policy(name).select(on_disk))
            except InvalidModelConfig:
                wanted = set()
            for version in sorted(set(on_disk) | served | set(transient), key=_version_order):
                row = self._version_status(
                    name, version, version in served, transient.get(version), version in wanted
                )
                if not ready_only or row.state == READY:
                    rows.append(row)
        return rows

    def _version_status(
        self, name: str, version: str, served: bool, transient: str | None, wanted: bool
    ) -> VersionStatus:
        if transient is not None:
            return VersionStatus(name, version, transient)
        if served:
            return VersionStatus(name, version, READY)
        failed = self._failed.get((name, version))
        if failed is not None:
            return VersionStatus(name, version, UNAVAILABLE, f"failed to load: {failed[0]}")
        if name in self._unloaded:
            return VersionStatus(name, version, UNAVAILABLE, "unloaded")
        if name in self._problems:
            return VersionStatus(name, version, UNAVAILABLE, self._problems[name])
        if name not in self._managed:
            return VersionStatus(name, version, UNAVAILABLE, "not loaded (loads on its first call)")
        if wanted:
            return VersionStatus(name, version, UNAVAILABLE, "new in the repository: loads at the next poll")
        return VersionStatus(
            name, version, UNAVAILABLE, f"outside its version policy ({self._policy_text(name)})"
        )

    def _check_name(self, name: str) -> None:
        if not name or not _MODEL_REF.fullmatch(name):
            raise errors.InvalidInput(
                f"model name {name[:64]!r} is not valid: use letters, digits, '.', '_' or '-' "
                "(at most 128 characters)"
            )

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh_models()

    async def _sync(self, name: str) -> None:
        async with self._lock(name):
            if name in self._managed:
                await self._sync_locked(name)
        self._notify(name)

    async def _sync_locked(self, name: str) -> None:
        """Load what the policy selects and is not served; repoint; retire what it no longer selects."""
        on_disk, policy = await asyncio.to_thread(self._read_model, name)  # file reads: off the loop
        try:
            if isinstance(policy, InvalidModelConfig):
                raise policy
            wanted = policy.select(on_disk)
        except InvalidModelConfig as error:
            reason = self._catalog.public_reason(error)
            if self._problems.get(name) != reason:
                log.error("model %s: %s; what it serves is kept", name, reason)
                self.metrics.model_load_failures.labels(model=name).inc()
            self._problems[name] = reason
            return
        self._problems.pop(name, None)
        for key in [key for key in self._failed if key[0] == name]:
            if key[1] not in on_disk or self._catalog.stamp(name, key[1]) != self._failed_stamps.get(key):
                del self._failed[key]  # removed, or written again since it failed: tried again
                self._failed_stamps.pop(key, None)
        for version in wanted:
            if self._lookup(name, version) is None and (name, version) not in self._failed:
                if not self._accepting:
                    return
                await self._load_version(name, version)
        ready = [version for version in wanted if self._lookup(name, version) is not None]
        current = self._lookup(name, None)
        if ready:
            keep = set(ready)
        elif current is not None:
            keep = {current.model.version}  # nothing newer could load: the serving version stays
        else:
            keep = set()
        self._point(name, max(keep, key=_version_order) if keep else None)
        for served in list(self._served.values()):
            if served.model.name == name and served.model.version not in keep:
                self._retire(served)
        self.metrics.model_versions_ready.labels(model=name).set(len(keep))

    def _read_model(self, name: str) -> tuple[list[str], VersionPolicy | InvalidModelConfig]:
        versions = self._catalog.versions(name)
        try:
            return versions, self._policy(name)
        except InvalidModelConfig as error:
            return versions, error

    async def _load_version(self, name: str, version: str) -> None:
        started = time.perf_counter()
        self._states[(name, version)] = LOADING
        self._load_started[(name, version)] = time.monotonic()
        stamp = self._catalog.stamp(name, version)  # before loading: a rewrite during it is seen
        try:
            model = await asyncio.to_thread(self._load_and_warm_up, name, version)
        except Exception as error:
            reason = self._catalog.public_reason(error)
            self._failed[(name, version)] = (reason, error)
            self._failed_stamps[(name, version)] = stamp
            self.metrics.model_load_failures.labels(model=name).inc()
            log.error("model %s version %s failed to load; it will not serve: %s", name, version, error)
            return
        finally:
            self._states.pop((name, version), None)
            self._load_started.pop((name, version), None)
        if not self._accepting:
            return
        served = self._start_batcher(model)
        self._aliases[(name, version)] = served.key
        elapsed = time.perf_counter() - started
        self._load_seconds[name] = elapsed
        self.metrics.model_loads.labels(model=name).inc()
        self.metrics.model_load_seconds.labels(model=name).observe(elapsed)
        log.info(
            "loaded model %s in %.2fs (labels: %d, batching: %s)",
            served.key,
            elapsed,
            len(model.labels),
            served.batcher.limits,
        )

    def _point(self, name: str, version: str | None) -> None:
        """Calls naming `name` and no version go to `version` from now on: one assignment."""
        previous = self._aliases.get((name, None))
        key = f"{name}:{version}" if version is not None else None
        if key is None:
            self._aliases.pop((name, None), None)
        else:
            self._aliases[(name, None)] = key
            if name == self.default_model_name:
                self._default = self._served[key]
        if previous is not None and key is not None and previous != key:
            self.metrics.model_swaps.labels(model=name).inc()
            log.info("model %s now answers from version %s (was %s)", name, version, previous)

    def _retire(self, served: _Served) -> asyncio.Task[None]:
        """Take a version out of serving now; its admitted calls finish, then it is stopped and freed."""
        served.retired = True
        key = served.key
        self._served.pop(key, None)
        self._aliases = {alias: k for alias, k in self._aliases.items() if k != key}
        if served.users == 0:
            served.drained.set()
        self._states[(served.model.name, served.model.version)] = UNLOADING
        task = asyncio.get_running_loop().create_task(self._drain_and_release(served))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drain_and_release(self, served: _Served) -> None:
        name, version, key = served.model.name, served.model.version, served.key
        log.info("unloading model %s: finishing the calls admitted to it", key)
        try:
            await served.drained.wait()
            await served.batcher.stop(drain=True)
        finally:
            self._states.pop((name, version), None)
            self.metrics.forget_model(key)
        model = served.model
        del served  # the last reference to the batcher here: the collection below can free it
        await asyncio.to_thread(self._release, model)
        log.info("unloaded model %s", key)

    def _release(self, model: LoadedModel) -> None:
        close = getattr(model, "close", None)
        if callable(close):
            close()  # drops the network and its buffers even if a finished call still holds the model
        gc.collect()  # the batcher and its model hold each other through callbacks
        release = getattr(self._models, "release", None)
        if callable(release):
            release()

    def _notify(self, name: str) -> None:
        ready = self._lookup(name, None) is not None
        for listener in self._listeners:
            try:
                listener(name, ready)
            except Exception:
                log.exception("model listener failed for %s", name)

    def _load_and_warm_up(self, name: str, version: str | None) -> LoadedModel:
        model: LoadedModel = self._models.load(name, version)
        warm_up = getattr(model, "warm_up", None)
        if callable(warm_up):
            # Every batch size up to the batcher's own limit, so the first calls after a load
            # or a swap do not pay for lazy initialisation or a new shape.
            try:
                warm_up(max_batch_size=self._batching.limits_for(model.config.batching).max_batch_size)
            except BaseException:
                self._close_quietly(model)  # loaded but unusable: give its memory back now
                raise
        return model

    @staticmethod
    def _close_quietly(model: LoadedModel) -> None:
        close = getattr(model, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.warning("closing model %s:%s failed", model.name, model.version, exc_info=True)

    def _start_batcher(self, model: LoadedModel) -> _Served:
        key = f"{model.name}:{model.version}"
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
        return served


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (0, version)
