"""Tokens through snaplearn-gateway: a real vision server with TLS, JWTs and static tokens (keys,
certificates and tokens made here), behind the real gateway (TLS on both sides).

The gateway carries admitted Classify calls as items of ClassifyStreams it opens itself, so the
server would see the stream opener's token, not each caller's. These tests hold it to the
rule that every call is judged as its own caller's: its token authenticates it, its scopes and
tenants decide what it may do, its rate limit is its own, and a JWT that expires while the
gateway's stream for it is still open stops working.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio

from snaplearn.vision.v1 import vision_pb2_grpc
from snaplearn_common.metrics import scrape
from snaplearn_common.security.settings import SecuritySettings
from tests.helpers.certificates import CertificateAuthority
from tests.helpers.gateway import gateway_processes
from tests.helpers.go_build import BUILD_TIMEOUT_S, build_go_command
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)
from tests.helpers.vision_server import (
    ServerFactory,
    correctly_classified_images,
    expect_status,
    request,
    server_factory,  # noqa: F401  (fixture)
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 180)]

# The token verifier's leeway on a JWT's exp (snaplearn_common.security.tokens.TokenVerifier).
JWT_LEEWAY_S = 30.0
RATE_PER_S, BURST = 1.0, 40
STATIC_TOKENS = {
    "static-school-a": {"subject": "app-school-a", "scope": "classify", "tenants": ["school-a"]},
    "static-recommend-only": {"subject": "dashboard-a", "scope": "recommend", "tenants": ["school-a"]},
    "static-school-c": {"subject": "app-school-c", "scope": "classify", "tenants": ["school-c"]},
}
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


class Keys:
    """Where the server's certificate, the JWT public key and the static tokens are, and how to sign."""

    def __init__(self, folder: Path) -> None:
        self.ca = CertificateAuthority()
        self.cert, self.key = folder / "tls.crt", folder / "tls.key"
        self.ca.issue("localhost", server=True).write(self.cert, self.key)
        self.ca_file = folder / "ca.crt"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.signing = ec.generate_private_key(ec.SECP256R1())
        self.jwt_keys = folder / "keys.pem"
        self.jwt_keys.write_bytes(
            self.signing.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.static = folder / "tokens.json"
        self.static.write_text(json.dumps(STATIC_TOKENS))

    def jwt(self, subject: str, tenants: list[str], *, exp: float, scope: str = "classify") -> str:
        claims: dict[str, Any] = {"sub": subject, "scope": scope, "tenants": tenants, "exp": int(exp)}
        return jwt.encode(claims, self.signing, algorithm="ES256")

    def security(self) -> SecuritySettings:
        return SecuritySettings.from_env(
            {},
            tls_cert=self.cert,
            tls_key=self.key,
            auth_jwt_keys=self.jwt_keys,
            auth_tokens_file=self.static,
            rate_limit_per_s=RATE_PER_S,
            rate_limit_burst=BURST,
        )


@pytest.fixture(scope="module")
def gateway_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_command("snaplearn-gateway", tmp_path_factory.mktemp("gateway-tokens"))


@pytest.fixture(scope="module")
def images(trained_model_repository: Path) -> dict[str, bytes]:  # noqa: F811
    return correctly_classified_images(Path(trained_model_repository))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def gateways(gateway_binary: Path, tmp_path: Path, keys: Keys) -> Iterator[Any]:
    with gateway_processes(gateway_binary, tmp_path) as start_gateway:

        def start(backend_port: int, *extra: str) -> tuple[str, int]:
            port, metrics_port = start_gateway(
                [
                    "--backend", f"localhost:{backend_port}", "--backend-connections", "2",
                    "--backend-tls-ca", str(keys.ca_file),
                    "--tls-cert", str(keys.cert), "--tls-key", str(keys.key),
                    "--stream-max-age", "120", "--stream-idle", "60", *extra,
                ]
            )  # fmt: skip
            return f"localhost:{port}", metrics_port

        yield start


def backend_port(running: Any) -> int:
    assert running.server.grpc is not None
    return int(running.server.grpc.port)


async def test_each_call_through_the_gateway_is_judged_by_its_own_token(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    gateways: Any,
    keys: Keys,
    images: dict[str, bytes],
) -> None:
    running = await server_factory.start(security=keys.security())
    target, metrics_port = gateways(backend_port(running))
    school_b = keys.jwt("app-school-b", ["school-b"], exp=time.time() + 300)
    credentials = grpc.ssl_channel_credentials(root_certificates=keys.ca.cert_pem)
    async with aio.secure_channel(target, credentials) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)

        async def classify(user: str, token: str | None, topic: str = "fractions") -> Any:
            metadata = bearer(token) if token is not None else None
            return await stub.Classify(request(images[topic], user=user), metadata=metadata, timeout=30)

        # A good static token and a good JWT, each for its own school's student.
        assert (await classify("school-a/s1", "static-school-a")).labels[0].label == "fractions"
        assert (await classify("school-b/s1", school_b, "geometry")).labels[0].label == "geometry"
        # No token, a bad one, a token without the classify scope: the server's own statuses.
        message = await expect_status(classify("school-a/s1", None), grpc.StatusCode.UNAUTHENTICATED)
        assert "bearer token" in message
        await expect_status(classify("school-a/s1", "not-a-token"), grpc.StatusCode.UNAUTHENTICATED)
        message = await expect_status(
            classify("school-a/s1", "static-recommend-only"), grpc.StatusCode.PERMISSION_DENIED
        )
        assert "classify" in message
        # Another school's student: refused, while the same caller's own calls in flight beside
        # it are answered (the refusal is that item's, not its stream's).
        foreign = asyncio.ensure_future(classify("school-b/s2", "static-school-a"))
        own = [asyncio.ensure_future(classify(f"school-a/beside-{i}", "static-school-a")) for i in range(6)]
        message = await expect_status(foreign, grpc.StatusCode.PERMISSION_DENIED)
        assert "school-b/s2" in message
        assert [(await call).labels[0].label for call in own] == ["fractions"] * 6
        # And school b's token may not act for school a's student, though a's stream is open.
        await expect_status(classify("school-a/s1", school_b), grpc.StatusCode.PERMISSION_DENIED)

        # Two callers at once, each for its own students, each with its own photos: every call
        # is answered, and with its own photo's label (nothing crosses between callers).
        calls = [
            asyncio.ensure_future(classify(f"school-a/c{i}", "static-school-a", "fractions"))
            for i in range(10)
        ] + [asyncio.ensure_future(classify(f"school-b/c{i}", school_b, "exponents")) for i in range(10)]
        labels = [(await call).labels[0].label for call in calls]
        assert labels == ["fractions"] * 10 + ["exponents"] * 10

        # A JWT refused once expired, though the gateway's stream for it opened while it was valid.
        expiring = keys.jwt("app-school-b", ["school-b"], exp=time.time() - JWT_LEEWAY_S + 3.0)
        assert (await classify("school-b/e1", expiring, "geometry")).labels[0].label == "geometry"
        await asyncio.sleep(max(0.0, jwt.decode(expiring, options={"verify_signature": False})["exp"]
                                + JWT_LEEWAY_S + 0.5 - time.time()))  # fmt: skip
        message = await expect_status(
            classify("school-b/e2", expiring, "geometry"), grpc.StatusCode.UNAUTHENTICATED
        )
        assert "expired" in message
        # One already expired when it arrives.
        stale = keys.jwt("app-school-b", ["school-b"], exp=time.time() - 2 * JWT_LEEWAY_S)
        await expect_status(classify("school-b/e3", stale), grpc.StatusCode.UNAUTHENTICATED)
        # The others are unaffected.
        assert (await classify("school-b/after", school_b, "geometry")).labels[0].label == "geometry"

    gateway = scrape(metrics_port)
    # One stream per caller token per server process (a few more where a refused stream reopens).
    assert gateway["snaplearn_gateway_classify_streams_opened_total"] >= 4


async def test_the_rate_limit_is_each_callers_own_through_the_gateway(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    gateways: Any,
    keys: Keys,
    images: dict[str, bytes],
) -> None:
    running = await server_factory.start(security=keys.security())
    target, _ = gateways(backend_port(running))
    credentials = grpc.ssl_channel_credentials(root_certificates=keys.ca.cert_pem)
    async with aio.secure_channel(target, credentials) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        photo = images["fractions"]
        codes: list[grpc.StatusCode] = []
        details = ""
        for i in range(BURST + 15):
            try:
                await stub.Classify(
                    request(photo, user=f"school-a/r{i}"), metadata=bearer("static-school-a"), timeout=30
                )
                codes.append(grpc.StatusCode.OK)
            except aio.AioRpcError as error:
                codes.append(error.code())
                details = error.details() or ""
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert refused >= 10, codes  # the burst, plus what the rate refilled while the loop ran
        assert codes.count(grpc.StatusCode.OK) + refused == len(codes), codes
        assert "rate limit" in details
        # Another caller behind the same gateway has its own bucket.
        reply = await stub.Classify(
            request(photo, user="school-c/r"), metadata=bearer("static-school-c"), timeout=30
        )
        assert reply.labels[0].label == "fractions"


async def test_the_gateway_can_refuse_a_missing_token_itself(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    gateways: Any,
    keys: Keys,
    images: dict[str, bytes],
) -> None:
    running = await server_factory.start(security=keys.security())
    target, metrics_port = gateways(backend_port(running), "--require-token")
    credentials = grpc.ssl_channel_credentials(root_certificates=keys.ca.cert_pem)
    async with aio.secure_channel(target, credentials) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        photo = images["fractions"]
        await expect_status(
            stub.Classify(request(photo, user="school-a/x"), timeout=30), grpc.StatusCode.UNAUTHENTICATED
        )
        reply = await stub.Classify(
            request(photo, user="school-a/x"), metadata=bearer("static-school-a"), timeout=30
        )
        assert reply.labels[0].label == "fractions"
    assert scrape(metrics_port)["snaplearn_gateway_tokenless_refused_total"] == 1
    served = scrape(running.server.metrics_port)
    assert served.get('snaplearn_vision_request_seconds_count{code="OK"}') == 1
