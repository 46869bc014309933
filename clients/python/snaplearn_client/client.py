"""Small synchronous clients for the vision and recommender services.

Retries use gRPC's own retry policy (service config), so they apply per attempt with
exponential backoff and only for UNAVAILABLE: a request that failed for a reason that
retrying cannot fix (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) fails at once.

A server secured with TLS and tokens takes `security=ChannelSecurity(ca_file=..., token=...)`
(a client certificate and key too, for mutual TLS); `ChannelSecurity.from_env()` reads
SNAPLEARN_TLS_CA, SNAPLEARN_TLS_CLIENT_CERT, SNAPLEARN_TLS_CLIENT_KEY and SNAPLEARN_TOKEN.

Filters on the catalog's declared features (`features=` of recommend and similar_items) are
FeatureFilter messages or a mapping, feature name -> what to keep:

    {"topic": ["Fractions", "Geometry"], "minutes": (None, 20), "grade": 4}

a list (or one value) keeps items with any of those values; a 2-tuple (min, max), either of them
None, keeps items of a numeric feature within that inclusive range; a dict may give both
({"values": [...], "min": 10, "max": 20}).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeAlias

import grpc

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc

DEFAULT_VISION_TARGET = "127.0.0.1:50051"
# What one ClassifyStream message carries at most (a larger photo goes alone).
STREAM_MESSAGE_ITEMS = 32
STREAM_MESSAGE_BYTES = 1024 * 1024
STREAM_ATTEMPTS = 3  # streams ended by a server shutting down, before the rest is UNAVAILABLE
_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}
DEFAULT_RECOMMENDER_TARGET = "127.0.0.1:50052"
FEEDBACK_KINDS = {
    "viewed": recommender_pb2.FEEDBACK_KIND_VIEWED,
    "completed": recommender_pb2.FEEDBACK_KIND_COMPLETED,
    "skipped": recommender_pb2.FEEDBACK_KIND_SKIPPED,
}
ATTEMPT_OUTCOMES = {
    "correct": recommender_pb2.ATTEMPT_OUTCOME_CORRECT,
    "incorrect": recommender_pb2.ATTEMPT_OUTCOME_INCORRECT,
}
OUTCOME_NAMES = {
    recommender_pb2.ATTEMPT_OUTCOME_UNSPECIFIED: "",
    **{value: name for name, value in ATTEMPT_OUTCOMES.items()},
}

FeatureValue: TypeAlias = str | int | float
# What one feature of the friendly mapping may say: one value, several, a (min, max) range, or a
# dict of values / min / max.
FeatureSpec: TypeAlias = (
    FeatureValue | Sequence[FeatureValue] | tuple[float | None, float | None] | Mapping[str, Any]
)
# Mapping values are FeatureSpecs; typed Any so that a literal dict of mixed kinds type-checks.
FeatureFilters: TypeAlias = Mapping[str, Any] | Iterable[recommender_pb2.FeatureFilter]


def _number(name: str, which: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"feature {name!r}: {which} must be a finite number, got {value!r}")
    return float(value)


def _value_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"a feature value must be a string or a number, got {value!r}")
    return value if isinstance(value, str) else format(value, "g")


def _is_range(spec: object) -> bool:
    return (
        isinstance(spec, tuple)
        and len(spec) == 2
        and all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in spec)
    )


def feature_filter(name: str, spec: FeatureSpec) -> recommender_pb2.FeatureFilter:
    """One FeatureFilter from the friendly form (see the module's docstring)."""
    if not isinstance(name, str) or not name:
        raise ValueError("a feature filter needs a feature name")
    values: Iterable[object]
    minimum = maximum = None
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"values", "min", "max"})
        if unknown:
            raise ValueError(f"feature {name!r}: unknown key {unknown[0]!r} (use values, min, max)")
        raw = spec.get("values", ())
        values = [raw] if isinstance(raw, str | int | float) else raw
        minimum, maximum = spec.get("min"), spec.get("max")
    elif _is_range(spec):
        assert isinstance(spec, tuple)
        values, (minimum, maximum) = (), spec
    elif isinstance(spec, str | int | float):
        values = [spec]
    elif isinstance(spec, Iterable):
        values = spec
    else:
        raise ValueError(f"feature {name!r}: expected values, a (min, max) range or a dict, got {spec!r}")
    result = recommender_pb2.FeatureFilter(name=name, values=[_value_text(v) for v in values])
    if minimum is not None:
        result.min = _number(name, "min", minimum)
    if maximum is not None:
        result.max = _number(name, "max", maximum)
    if not result.values and not result.HasField("min") and not result.HasField("max"):
        raise ValueError(f"feature {name!r}: give at least one value or a bound")
    return result


def feature_filters(features: FeatureFilters | None) -> list[recommender_pb2.FeatureFilter]:
    """FeatureFilter messages from messages or the friendly mapping (see the module's docstring)."""
    if features is None:
        return []
    if isinstance(features, Mapping):
        return [feature_filter(name, spec) for name, spec in features.items()]
    result = []
    for item in features:
        if not isinstance(item, recommender_pb2.FeatureFilter):
            raise ValueError(f"expected FeatureFilter messages or a mapping, got {item!r}")
        result.append(item)
    return result


def _filters(
    grades: Sequence[int], formats: Sequence[str], concepts: Sequence[str], features: FeatureFilters | None
) -> recommender_pb2.RecommendFilters:
    return recommender_pb2.RecommendFilters(
        grades=grades, formats=formats, concepts=concepts, features=feature_filters(features)
    )


def _service_config(service: str, max_attempts: int) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": service}],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(max_attempts, 5)),
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a secured server: TLS (ca_file: the CA that signed the server's certificate;
    None uses the system's roots), mutual TLS (cert_file + key_file: this client's certificate),
    and a bearer token. tls=False with a token sends the token over plaintext: for a
    development server on localhost only."""

    tls: bool = True
    ca_file: Path | str | None = None
    cert_file: Path | str | None = None
    key_file: Path | str | None = None
    token: str | None = None
    server_name: str | None = None  # the name to check the certificate against, if not the target's

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ChannelSecurity | None:
        """From SNAPLEARN_TLS_CA, SNAPLEARN_TLS_CLIENT_CERT, SNAPLEARN_TLS_CLIENT_KEY and
        SNAPLEARN_TOKEN (None when none is set: plaintext, no token)."""
        env = os.environ if environ is None else environ
        ca, cert, key = (
            env.get(f"SNAPLEARN_TLS_{name}") or None for name in ("CA", "CLIENT_CERT", "CLIENT_KEY")
        )
        token = env.get("SNAPLEARN_TOKEN") or None
        if ca is None and cert is None and token is None:
            return None
        return cls(
            tls=ca is not None or cert is not None, ca_file=ca, cert_file=cert, key_file=key, token=token
        )

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate and its key go together")
        tls = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )
        if self.token is None:
            return tls
        return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(self.token))


def _read(path: Path | str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call on a plaintext channel (grpc's call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def _channel(
    target: str, service: str, max_attempts: int, security: ChannelSecurity | None = None
) -> grpc.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _service_config(service, max_attempts)),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]
    if security is None:
        return grpc.insecure_channel(target, options=options)
    if security.tls:
        if security.server_name is not None:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        return grpc.secure_channel(target, security.credentials(), options=options)
    channel = grpc.insecure_channel(target, options=options)
    if security.token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(security.token))


class _Client:
    service_name = ""

    def __init__(
        self,
        target: str,
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        *,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = _channel(target, self.service_name, max_attempts, security)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError otherwise)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ClassifyOutcome:
    """One photo's answer from classify_many: a response (code OK), or a status and message."""

    code: grpc.StatusCode
    message: str
    response: vision_pb2.ClassifyResponse | None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


class RecommenderClient(_Client):
    service_name = "snaplearn.recommender.v1.RecommenderService"

    def __init__(
        self,
        target: str = DEFAULT_RECOMMENDER_TARGET,
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        *,
        security: ChannelSecurity | None = None,
    ) -> None:
        super().__init__(target, timeout_s, max_attempts, security=security)
        self._stub = recommender_pb2_grpc.RecommenderServiceStub(self._channel)

    def recommend(
        self,
        user_id: str,
        k: int = 10,
        exclude_seen: bool = False,
        grades: Sequence[int] = (),
        formats: Sequence[str] = (),
        concepts: Sequence[str] = (),
        timeout_s: float | None = None,
        *,
        features: FeatureFilters | None = None,
    ) -> recommender_pb2.RecommendResponse:
        """What `user_id` should practise next. `features`: filters on the catalog's declared
        features (FeatureFilter messages or the friendly mapping of the module's docstring)."""
        request = recommender_pb2.RecommendRequest(
            user_id=user_id,
            k=k,
            exclude_seen=exclude_seen,
            filters=_filters(grades, formats, concepts, features),
        )
        return self._stub.Recommend(request, timeout=timeout_s or self.timeout_s, wait_for_ready=True)

    def similar_items(
        self,
        item_id: str,
        k: int = 10,
        grades: Sequence[int] = (),
        formats: Sequence[str] = (),
        concepts: Sequence[str] = (),
        timeout_s: float | None = None,
        *,
        features: FeatureFilters | None = None,
    ) -> recommender_pb2.SimilarItemsResponse:
        """Items closest to `item_id` in the model's item space (NOT_FOUND for an unknown id);
        `features` as for recommend."""
        request = recommender_pb2.SimilarItemsRequest(
            item_id=item_id,
            k=k,
            filters=_filters(grades, formats, concepts, features),
        )
        return self._stub.SimilarItems(request, timeout=timeout_s or self.timeout_s, wait_for_ready=True)

    def record_feedback(
        self,
        user_id: str,
        item_id: str,
        kind: str,
        request_id: str = "",
        time_s: float | None = None,
        timeout_s: float | None = None,
        *,
        outcome: str | int | None = None,
        score: float | None = None,
    ) -> recommender_pb2.RecordFeedbackResponse:
        """The student viewed, completed or skipped an item (`kind`: one of FEEDBACK_KINDS).

        Without a request_id one is generated here, so that gRPC's retries of this call (on
        UNAVAILABLE) record the feedback once. time_s: when it happened (default: now, server side).
        An answered exercise (an attempt) gives `outcome` ("correct" / "incorrect", or an
        ATTEMPT_OUTCOME_* value) and/or `score` in [0, 1]: they move the student's mastery of the
        item's concept. The server checks the score (INVALID_ARGUMENT outside [0, 1]).
        """
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FEEDBACK_KINDS)}, got {kind!r}")
        request = recommender_pb2.RecordFeedbackRequest(
            user_id=user_id,
            item_id=item_id,
            kind=FEEDBACK_KINDS[kind],
            request_id=request_id or str(uuid.uuid4()),
            outcome=_outcome(outcome),
        )
        if score is not None:
            request.score = score
        if time_s is not None:
            request.time.FromNanoseconds(int(time_s * 1e9))
        return self._stub.RecordFeedback(request, timeout=timeout_s or self.timeout_s, wait_for_ready=True)

    def student_state(
        self, user_id: str, k: int = 10, timeout_s: float | None = None
    ) -> recommender_pb2.GetStudentStateResponse:
        """A student's mastery per concept (weakest first), latest attempts (oldest first) and what
        Recommend suggests now with its reasons, from one snapshot (NOT_FOUND for a student the
        model has no events of)."""
        request = recommender_pb2.GetStudentStateRequest(user_id=user_id, k=k)
        return self._stub.GetStudentState(request, timeout=timeout_s or self.timeout_s, wait_for_ready=True)

    def forget_student(
        self, user_id: str, request_id: str = "", timeout_s: float | None = None
    ) -> recommender_pb2.ForgetStudentResponse:
        """Erase a student: a tombstone on the bus removes their rows, profile, mastery and attempts
        from the model, the next snapshot and the next checkpoint (needs the admin scope).
        request_id makes a retry publish nothing (accepted is then False)."""
        request = recommender_pb2.ForgetStudentRequest(user_id=user_id, request_id=request_id)
        return self._stub.ForgetStudent(request, timeout=timeout_s or self.timeout_s, wait_for_ready=True)


def _outcome(outcome: str | int | None) -> recommender_pb2.AttemptOutcome:
    if outcome is None or outcome == "":
        return recommender_pb2.ATTEMPT_OUTCOME_UNSPECIFIED
    if isinstance(outcome, str):
        if outcome not in ATTEMPT_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(ATTEMPT_OUTCOMES)}, got {outcome!r}")
        return ATTEMPT_OUTCOMES[outcome]
    for value in OUTCOME_NAMES:
        if value == outcome and not isinstance(outcome, bool):
            return value
    raise ValueError(f"unknown attempt outcome {outcome!r}")


class VisionClient(_Client):
    service_name = "snaplearn.vision.v1.VisionService"

    def __init__(
        self,
        target: str = DEFAULT_VISION_TARGET,
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        *,
        security: ChannelSecurity | None = None,
    ):
        super().__init__(target, timeout_s, max_attempts, security=security)
        self._stub = vision_pb2_grpc.VisionServiceStub(self._channel)

    def classify(
        self,
        image: bytes,
        user_id: str,
        top_k: int = 0,
        model_name: str = "",
        model_version: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> vision_pb2.ClassifyResponse:
        request = vision_pb2.ClassifyRequest(
            user_id=user_id,
            image=image,
            top_k=top_k,
            model_name=model_name,
            model_version=model_version,
            request_id=request_id,
        )
        return self._stub.Classify(request, timeout=timeout_s or self.timeout_s, wait_for_ready=True)

    def classify_many(
        self,
        images: Sequence[bytes],
        user_id: str,
        top_k: int = 0,
        model_name: str = "",
        model_version: str = "",
        timeout_s: float | None = None,
    ) -> list[ClassifyOutcome]:
        """Classify many photos over one ClassifyStream: one outcome per image, in order.

        Each photo is its own Classify (its own event, its own status: one unreadable photo
        fails alone) with `timeout_s` as its deadline; they share one stream, so the server
        batches them together and pays its per-call work once per message, not per photo.
        Photos a server left unstarted because it was shutting down are sent again. Raises
        grpc.RpcError only if the stream itself fails (the server unreachable, ...).
        """
        timeout = timeout_s or self.timeout_s

        def messages(indexes: list[int]) -> Iterator[vision_pb2.ClassifyStreamRequest]:
            items: list[vision_pb2.ClassifyStreamItem] = []
            size = 0
            for index in indexes:
                request = vision_pb2.ClassifyRequest(
                    user_id=user_id,
                    image=images[index],
                    top_k=top_k,
                    model_name=model_name,
                    model_version=model_version,
                )
                items.append(
                    vision_pb2.ClassifyStreamItem(id=index, request=request, timeout_ms=timeout * 1000.0)
                )
                size += len(images[index])
                if len(items) >= STREAM_MESSAGE_ITEMS or size >= STREAM_MESSAGE_BYTES:
                    yield vision_pb2.ClassifyStreamRequest(items=items)
                    items, size = [], 0
            if items:
                yield vision_pb2.ClassifyStreamRequest(items=items)

        outcomes: dict[int, ClassifyOutcome] = {}
        missing = list(range(len(images)))
        for _ in range(STREAM_ATTEMPTS):
            # The stream's own deadline leaves the last items their full timeout after sending.
            replies = self._stub.ClassifyStream(
                messages(missing), timeout=2 * timeout + 5.0, wait_for_ready=True
            )
            for message in replies:
                for result in message.results:
                    outcomes[result.id] = ClassifyOutcome(
                        code=_STATUS_BY_CODE.get(result.code, grpc.StatusCode.UNKNOWN),
                        message=result.message,
                        response=result.response if result.code == 0 else None,
                    )
            # A stream ends OK with items unanswered only when that server is shutting down: it
            # never started them, so they are sent again (a new stream reaches another server).
            missing = [index for index in missing if index not in outcomes]
            if not missing:
                break
        for index in missing:
            outcomes[index] = ClassifyOutcome(
                code=grpc.StatusCode.UNAVAILABLE,
                message="the server shut down before starting this photo; retry",
                response=None,
            )
        return [outcomes[index] for index in range(len(images))]
