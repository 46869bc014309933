"""The real vision server with TLS and tokens from its own settings (VisionSettings.security):
the wiring from settings to the served port, end to end. The rules themselves are tested in
test_security.py."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_common.security.settings import SecuritySettings
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.certificates import CertificateAuthority
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import ServerFactory, request, server_factory  # noqa: F401 (fixture)


async def test_secured_vision_server(server_factory: ServerFactory, tmp_path: Path) -> None:  # noqa: F811
    ca = CertificateAuthority()
    ca.issue("localhost", server=True).write(tmp_path / "tls.crt", tmp_path / "tls.key")
    signing = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "keys.pem").write_bytes(
        signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    security = SecuritySettings.from_env(
        {}, tls_cert=tmp_path / "tls.crt", tls_key=tmp_path / "tls.key", auth_jwt_keys=tmp_path / "keys.pem"
    )
    running = await server_factory.start(security=security)
    port = running.server.grpc.port if running.server.grpc is not None else 0

    def token(scope: str) -> tuple[tuple[str, str], ...]:
        claims = {"sub": "app-a", "scope": scope, "tenants": ["school-a"], "exp": int(time.time()) + 300}
        return (("authorization", "Bearer " + jwt.encode(claims, signing, algorithm="ES256")),)

    photo = sample_image_bytes("fractions")
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    async with aio.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        reply = await stub.Classify(
            request(photo, user="school-a/s1"), metadata=token("classify"), timeout=30
        )
        assert reply.labels and reply.model_name
        for user, metadata, expected in (
            ("school-a/s1", None, grpc.StatusCode.UNAUTHENTICATED),
            ("school-a/s1", token("recommend"), grpc.StatusCode.PERMISSION_DENIED),
            ("school-b/s1", token("classify"), grpc.StatusCode.PERMISSION_DENIED),
        ):
            try:
                await stub.Classify(request(photo, user=user), metadata=metadata, timeout=30)
            except aio.AioRpcError as error:
                assert error.code() == expected, (user, error.details())
            else:
                raise AssertionError(f"{user} with {metadata is not None and 'a token'} was answered")
        # The real ClassifyStream: each item is checked as its own Classify call. A foreign
        # student's item is refused PERMISSION_DENIED on its own; the stream goes on and ends OK.
        stream = stub.ClassifyStream(metadata=token("classify"), timeout=60)
        answers: dict[int, tuple[int, str]] = {}
        for item_id, user in ((1, "school-a/s1"), (2, "school-b/s1"), (3, "school-a/s2")):
            item = vision_pb2.ClassifyStreamItem(id=item_id, request=request(photo, user=user))
            await stream.write(vision_pb2.ClassifyStreamRequest(items=[item]))
            while item_id not in answers:
                answer = await stream.read()
                assert answer is not aio.EOF
                answers.update({r.id: (r.code, r.message) for r in answer.results})
        await stream.done_writing()
        while await stream.read() is not aio.EOF:
            pass
        assert answers[1][0] == answers[3][0] == grpc.StatusCode.OK.value[0], answers
        assert answers[2][0] == grpc.StatusCode.PERMISSION_DENIED.value[0], answers
        assert "may not act for user 'school-b/s1'" in answers[2][1], answers
        assert await stream.code() == grpc.StatusCode.OK, await stream.details()
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
        try:
            await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("a plaintext client was answered by a TLS server")
