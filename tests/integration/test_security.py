"""TLS, tokens, scopes, the tenant rule and the rate limit, against real gRPC servers on port 0
with real certificates and real JWTs made in the test.

The servers are the shared bootstrap (start_grpc_server, what both SnapLearn servers use) with
stand-in servicers that answer with what they were sent, so that what is under test is only
the security in front of them; test_secured_vision_server runs the real vision server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_client.client import ChannelSecurity, RecommenderClient
from snaplearn_common.security.interceptor import ITEM_CHECKS
from snaplearn_common.security.settings import SecuritySettings
from snaplearn_common.server import GrpcServer, start_grpc_server
from tests.helpers.certificates import CertificateAuthority

RECOMMENDER = "snaplearn.recommender.v1.RecommenderService"
VISION = "snaplearn.vision.v1.VisionService"
STATIC_TOKEN = "static-dev-token-school-a"


class _EchoRecommender(recommender_pb2_grpc.RecommenderServiceServicer):
    async def Recommend(self, request: Any, context: Any) -> recommender_pb2.RecommendResponse:
        return recommender_pb2.RecommendResponse(user_id=request.user_id, model_version="echo")

    async def RecordFeedback(self, request: Any, context: Any) -> recommender_pb2.RecordFeedbackResponse:
        return recommender_pb2.RecordFeedbackResponse()


class _EchoVision(vision_pb2_grpc.VisionServiceServicer):
    """Answers each stream item with the interceptor's per-item refusal, as edges/stream.py does."""

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[vision_pb2.ClassifyStreamResponse]:
        checks = ITEM_CHECKS.get()
        async for message in request_iterator:
            results = []
            for item in message.items:
                refusal = checks.refusal(item.request.user_id) if checks is not None else None
                code, text = (refusal[0].value[0], refusal[1]) if refusal is not None else (0, "")
                results.append(vision_pb2.ClassifyStreamResult(id=item.id, code=code, message=text))
            yield vision_pb2.ClassifyStreamResponse(results=results)


def _register(server: aio.Server) -> None:
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(_EchoRecommender(), server)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(_EchoVision(), server)


async def _start(**security: Any) -> GrpcServer:
    return await start_grpc_server(
        [_register], [RECOMMENDER, VISION], security=SecuritySettings.from_env({}, **security)
    )


class Keys:
    """An ES256 signing key; its public half in a PEM file the server reads."""

    def __init__(self, path: Path) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.path = path
        path.write_bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def token(self, subject: str, scopes: str, tenants: list[str] | None = None, ttl_s: float = 300) -> str:
        claims: dict[str, Any] = {"sub": subject, "scope": scopes, "exp": int(time.time() + ttl_s)}
        if tenants is not None:
            claims["tenants"] = tenants
        return jwt.encode(claims, self.private, algorithm="ES256")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "jwt-keys.pem")


@pytest.fixture
def static_tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps({STATIC_TOKEN: {"subject": "app-a", "scopes": ["recommend"], "tenants": ["school-a"]}})
    )
    return path


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _recommend(channel: aio.Channel, user: str = "school-a/s1", token: str | None = None) -> Any:
    stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
    metadata = _bearer(token) if token is not None else None
    return stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=3), metadata=metadata, timeout=10)


def _tls_files(tmp_path: Path, ca: CertificateAuthority, prefix: str = "server") -> tuple[Path, Path]:
    cert, key = tmp_path / f"{prefix}.crt", tmp_path / f"{prefix}.key"
    ca.issue("localhost", server=True).write(cert, key)
    return cert, key


def _secure(port: int, ca_pem: bytes, client: tuple[bytes, bytes] | None = None) -> aio.Channel:
    key, cert = client if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key, certificate_chain=cert
    )
    return aio.secure_channel(f"localhost:{port}", credentials)


# -- TLS --------------------------------------------------------------------------------------


async def test_tls_serves_and_refuses_plaintext(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    cert, key = _tls_files(tmp_path, ca)
    server = await _start(tls_cert=cert, tls_key=key)
    try:
        async with _secure(server.port, ca.cert_pem) as channel:
            reply = await _recommend(channel)
            assert reply.user_id == "school-a/s1"
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as plaintext:
            code, _ = await _code(_recommend(plaintext))
            assert code == grpc.StatusCode.UNAVAILABLE
        async with _secure(server.port, CertificateAuthority("another CA").cert_pem) as untrusted:
            code, _ = await _code(_recommend(untrusted))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


async def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    cert, key = _tls_files(tmp_path, ca)
    client_ca = CertificateAuthority("client CA")
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem)
    server = await _start(tls_cert=cert, tls_key=key, tls_client_ca=tmp_path / "client-ca.pem")
    try:
        async with _secure(server.port, ca.cert_pem) as no_cert:
            code, _ = await _code(_recommend(no_cert))
            assert code == grpc.StatusCode.UNAVAILABLE
        stranger = CertificateAuthority("stranger").issue("app", server=False)
        async with _secure(server.port, ca.cert_pem, (stranger.key_pem, stranger.cert_pem)) as wrong_ca:
            code, _ = await _code(_recommend(wrong_ca))
            assert code == grpc.StatusCode.UNAVAILABLE
        client = client_ca.issue("school-a-app", server=False)
        async with _secure(server.port, ca.cert_pem, (client.key_pem, client.cert_pem)) as channel:
            assert (await _recommend(channel)).user_id == "school-a/s1"
    finally:
        await server.stop(0)


async def test_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    old_ca, new_ca = CertificateAuthority("old CA"), CertificateAuthority("new CA")
    cert, key = _tls_files(tmp_path, old_ca)
    server = await _start(tls_cert=cert, tls_key=key)
    try:
        async with _secure(server.port, old_ca.cert_pem) as channel:
            assert (await _recommend(channel)).user_id == "school-a/s1"
        new_ca.issue("localhost", server=True).write(cert, key)
        # New connections get the new certificate: a client trusting only the new CA connects,
        # one trusting only the old CA no longer does.
        async with _secure(server.port, new_ca.cert_pem) as channel:
            assert (await _recommend(channel)).user_id == "school-a/s1"
        async with _secure(server.port, old_ca.cert_pem) as stale:
            code, _ = await _code(_recommend(stale))
            assert code == grpc.StatusCode.UNAVAILABLE
        assert server.security.tls is not None and server.security.tls.reloads == 1
    finally:
        await server.stop(0)


# -- tokens and scopes ------------------------------------------------------------------------


async def test_tokens_and_scopes(keys: Keys, static_tokens: Path) -> None:
    server = await _start(auth_jwt_keys=keys.path, auth_tokens_file=static_tokens)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            code, message = await _code(_recommend(channel))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in message
            code, _ = await _code(_recommend(channel, token="not-a-token"))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            expired = keys.token("app-a", "recommend", ["school-a"], ttl_s=-3600)
            code, message = await _code(_recommend(channel, token=expired))
            assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, "the token has expired")
            forged = Keys(keys.path.with_name("other.pem")).token("app-a", "recommend", ["school-a"])
            code, message = await _code(_recommend(channel, token=forged))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "signature" in message

            classify_only = keys.token("app-a", "classify", ["school-a"])
            code, message = await _code(_recommend(channel, token=classify_only))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "'recommend'" in message

            reply = await _recommend(channel, token=keys.token("app-a", "recommend", ["school-a"]))
            assert reply.user_id == "school-a/s1"
            assert (await _recommend(channel, token=STATIC_TOKEN)).model_version == "echo"
            # The static token has no feedback scope.
            feedback = recommender_pb2_grpc.RecommenderServiceStub(channel).RecordFeedback(
                recommender_pb2.RecordFeedbackRequest(user_id="school-a/s1", item_id="i"),
                metadata=_bearer(STATIC_TOKEN),
            )
            assert (await _code(feedback))[0] == grpc.StatusCode.PERMISSION_DENIED

            # Probes need no token.
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=RECOMMENDER))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # Reflection: any valid token, none refused.
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            listing = reflection_pb2.ServerReflectionRequest(list_services="")

            async def services(metadata: Any) -> set[str]:
                answers = [
                    a async for a in reflection.ServerReflectionInfo(iter([listing]), metadata=metadata)
                ]
                return {s.name for s in answers[0].list_services_response.service}

            assert RECOMMENDER in await services(_bearer(STATIC_TOKEN))
            assert (await _code(services(None)))[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)


async def test_reflection_can_be_turned_off() -> None:
    server = await _start(reflection=False)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            code, _ = await _code(_consume(reflection.ServerReflectionInfo(iter([listing]))))
            assert code == grpc.StatusCode.UNIMPLEMENTED
            assert (await _recommend(channel)).user_id == "school-a/s1"  # nothing else asked for
    finally:
        await server.stop(0)


async def _consume(call: Any) -> list[Any]:
    return [item async for item in call]


# -- the tenant rule --------------------------------------------------------------------------


async def test_tenant_rule(keys: Keys) -> None:
    server = await _start(auth_jwt_keys=keys.path)
    school_a = keys.token("app-a", "recommend feedback classify", ["school-a"])
    student = keys.token("school-b/s9", "recommend")
    service = keys.token("back-office", "recommend", ["*"])
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert (await _recommend(channel, "school-a/s1", school_a)).user_id == "school-a/s1"
            code, message = await _code(_recommend(channel, "school-b/s1", school_a))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "school-b/s1" in message
            # A prefix is a whole tenant, not a string prefix.
            assert (await _code(_recommend(channel, "school-ab/s1", school_a)))[
                0
            ] == grpc.StatusCode.PERMISSION_DENIED
            assert (await _code(_recommend(channel, "school-a", school_a)))[
                0
            ] == grpc.StatusCode.PERMISSION_DENIED
            # A student's own token reaches only that student.
            assert (await _recommend(channel, "school-b/s9", student)).user_id == "school-b/s9"
            assert (await _code(_recommend(channel, "school-b/s8", student)))[
                0
            ] == grpc.StatusCode.PERMISSION_DENIED
            assert (await _recommend(channel, "school-z/s1", service)).user_id == "school-z/s1"

            # On ClassifyStream each item is one Classify call: an item for another tenant is
            # refused on its own, the stream goes on and ends OK.
            stream = vision_pb2_grpc.VisionServiceStub(channel).ClassifyStream(metadata=_bearer(school_a))

            def item(item_id: int, user: str) -> vision_pb2.ClassifyStreamRequest:
                request = vision_pb2.ClassifyRequest(user_id=user, image=b"x")
                return vision_pb2.ClassifyStreamRequest(
                    items=[vision_pb2.ClassifyStreamItem(id=item_id, request=request)]
                )

            answers = []
            for item_id, user in ((1, "school-a/s1"), (2, "school-b/s1"), (3, "school-a/s2")):
                await stream.write(item(item_id, user))
                answers += [(r.id, r.code, r.message) for r in (await stream.read()).results]
            await stream.done_writing()
            assert await stream.read() is aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
            refused = grpc.StatusCode.PERMISSION_DENIED.value[0]
            assert [(i, c) for i, c, _ in answers] == [(1, 0), (2, refused), (3, 0)]
            assert "school-b/s1" in answers[1][2]
    finally:
        await server.stop(0)


# -- the rate limit ---------------------------------------------------------------------------


async def test_rate_limit_per_caller(keys: Keys) -> None:
    server = await _start(auth_jwt_keys=keys.path, rate_limit_per_s=0.01, rate_limit_burst=2)
    first = keys.token("app-a", "recommend", ["*"])
    second = keys.token("app-b", "recommend", ["*"])
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            request = recommender_pb2.RecommendRequest(user_id="u", k=1)
            for _ in range(2):
                await stub.Recommend(request, metadata=_bearer(first))
            call = stub.Recommend(request, metadata=_bearer(first))
            code, message = await _code(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in message
            trailers = dict(await call.trailing_metadata() or ())
            assert 90_000 <= int(trailers["grpc-retry-pushback-ms"]) <= 100_000
            # Another caller has its own bucket; probes are never limited.
            await stub.Recommend(request, metadata=_bearer(second))
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(5):
                await health.Check(health_pb2.HealthCheckRequest())
    finally:
        await server.stop(0)


async def test_rate_limit_takes_a_token_per_stream_item(keys: Keys) -> None:
    """Through the gateway a caller's Classify calls are items of one ClassifyStream: each item
    takes a token from the caller's bucket (the stream's opening takes one too)."""
    server = await _start(auth_jwt_keys=keys.path, rate_limit_per_s=0.01, rate_limit_burst=3)
    token = keys.token("app-a", "classify", ["*"])
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream = vision_pb2_grpc.VisionServiceStub(channel).ClassifyStream(metadata=_bearer(token))
            answers = []
            for item_id in (1, 2, 3):
                request = vision_pb2.ClassifyRequest(user_id="s", image=b"x")
                await stream.write(
                    vision_pb2.ClassifyStreamRequest(
                        items=[vision_pb2.ClassifyStreamItem(id=item_id, request=request)]
                    )
                )
                answers += [(r.id, r.code, r.message) for r in (await stream.read()).results]
            await stream.done_writing()
            assert await stream.read() is aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
            exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert [(i, c) for i, c, _ in answers] == [(1, 0), (2, 0), (3, exhausted)]
            assert "rate limit of 0.01 calls/s" in answers[2][2] and "retry in" in answers[2][2]
    finally:
        await server.stop(0)


# -- the Python client library ------------------------------------------------------------------


async def test_client_library_over_mutual_tls_with_a_token(tmp_path: Path, keys: Keys) -> None:
    ca = CertificateAuthority()
    cert, key = _tls_files(tmp_path, ca)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    client_cert, client_key = tmp_path / "client.crt", tmp_path / "client.key"
    ca.issue("school-a-app", server=False).write(client_cert, client_key)
    server = await _start(
        tls_cert=cert, tls_key=key, tls_client_ca=tmp_path / "ca.pem", auth_jwt_keys=keys.path
    )
    token = keys.token("app-a", "recommend", ["school-a"])

    def recommend(security: ChannelSecurity) -> Callable[[], Any]:
        def call() -> Any:
            with RecommenderClient(f"localhost:{server.port}", security=security, max_attempts=2) as client:
                return client.recommend("school-a/s1", k=3)

        return call

    try:
        secured = ChannelSecurity(
            ca_file=tmp_path / "ca.pem", cert_file=client_cert, key_file=client_key, token=token
        )
        reply = await asyncio.to_thread(recommend(secured))
        assert reply.user_id == "school-a/s1"
        no_token = ChannelSecurity(ca_file=tmp_path / "ca.pem", cert_file=client_cert, key_file=client_key)
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(recommend(no_token))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        from_env = ChannelSecurity.from_env(
            {
                "SNAPLEARN_TLS_CA": str(tmp_path / "ca.pem"),
                "SNAPLEARN_TLS_CLIENT_CERT": str(client_cert),
                "SNAPLEARN_TLS_CLIENT_KEY": str(client_key),
                "SNAPLEARN_TOKEN": token,
            }
        )
        assert from_env == ChannelSecurity(
            ca_file=str(tmp_path / "ca.pem"),
            cert_file=str(client_cert),
            key_file=str(client_key),
            token=token,
        )
    finally:
        await server.stop(0)


async def test_client_library_sends_a_token_over_plaintext(static_tokens: Path) -> None:
    server = await _start(auth_tokens_file=static_tokens)
    try:

        def call() -> Any:
            security = ChannelSecurity(tls=False, token=STATIC_TOKEN)
            with RecommenderClient(f"127.0.0.1:{server.port}", security=security) as client:
                return client.recommend("school-a/s1")

        assert (await asyncio.to_thread(call)).user_id == "school-a/s1"
    finally:
        await server.stop(0)
