"""The security rules without a server: scopes per method, the tenant rule, token verification
(PEM and JWKS key files, key rotation without a restart), token buckets and the settings."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from snaplearn_common.security.bootstrap import ServerSecurity
from snaplearn_common.security.principal import Principal, Scope, scope_for
from snaplearn_common.security.ratelimit import RateLimiter
from snaplearn_common.security.settings import SecuritySettings
from snaplearn_common.security.tokens import InvalidToken, TokenVerifier
from snaplearn_common.settings import InvalidSettings


def test_scopes_per_method() -> None:
    assert scope_for("/snaplearn.vision.v1.VisionService/Classify") is Scope.CLASSIFY
    assert scope_for("/inference.GRPCInferenceService/ModelInfer") is Scope.CLASSIFY
    assert scope_for("/snaplearn.recommender.v1.RecommenderService/SimilarItems") is Scope.RECOMMEND
    assert scope_for("/snaplearn.recommender.v1.RecommenderService/RecordFeedback") is Scope.FEEDBACK
    assert scope_for("/snaplearn.recommender.v1.RecommenderService/GetStudentState") is Scope.RECOMMEND
    # Model repository management, and any method nobody listed, need admin.
    assert scope_for("/inference.GRPCInferenceService/RepositoryModelLoad") is Scope.ADMIN
    assert scope_for("/snaplearn.new.v1.Service/Anything") is Scope.ADMIN
    admin = Principal("ops", scopes=frozenset({"admin"}))
    assert admin.allows(Scope.RECOMMEND) and not Principal("x").allows(Scope.CLASSIFY)


def test_tenant_rule() -> None:
    school = Principal("app-a", tenants=frozenset({"school-a", "school-c"}))
    assert school.acts_for("school-a/17") and school.acts_for("school-c/x/y")
    assert not school.acts_for("school-b/17")
    assert not school.acts_for("school-a")  # a tenant's name is not one of its students
    assert not school.acts_for("school-a/")
    assert not school.acts_for("school-ab/1")
    assert Principal("school-b/17").acts_for("school-b/17")
    assert Principal("svc", tenants=frozenset({"*"})).acts_for("anyone")
    refusal = school.refusal_for(["school-a/1", "", "school-b/2"])
    assert refusal is not None and "school-b/2" in refusal


def _key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pem


def _token(key: ec.EllipticCurvePrivateKey, kid: str | None = None, **claims: object) -> str:
    body = {"sub": "app-a", "scope": "classify recommend", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid} if kid else None)


def test_jwt_claims_issuer_audience_and_key_rotation(tmp_path: Path) -> None:
    old, old_pem = _key()
    new, new_pem = _key()
    path = tmp_path / "keys.pem"
    path.write_bytes(old_pem)
    verifier = TokenVerifier(jwt_keys=path, issuer="https://id.school", audience="snaplearn")
    good = _token(old, iss="https://id.school", aud="snaplearn", tenants=["school-a"], tenant="school-b")
    principal = verifier.verify(good)
    assert principal.subject == "app-a"
    assert principal.scopes == {"classify", "recommend"}
    assert principal.tenants == {"school-a", "school-b"}
    with pytest.raises(InvalidToken, match="Invalid issuer"):
        verifier.verify(_token(old, iss="https://evil", aud="snaplearn"))
    with pytest.raises(InvalidToken, match=r"(?i)audience"):
        verifier.verify(_token(old, iss="https://id.school", aud="other"))
    with pytest.raises(InvalidToken, match="exp"):
        verifier.verify(
            jwt.encode({"sub": "a", "iss": "https://id.school", "aud": "snaplearn"}, old, "ES256")
        )
    # Rotation: the file now lists the new key and the old one, then only the new one.
    path.write_bytes(new_pem + old_pem)
    fresh = _token(new, iss="https://id.school", aud="snaplearn")
    assert verifier.verify(fresh).subject == "app-a"
    path.write_bytes(new_pem)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    with pytest.raises(InvalidToken, match="signature"):
        verifier.verify(good)  # verified (and cached) before: refused once its key is gone
    # A broken rewrite keeps the last good keys.
    path.write_bytes(b"garbage")
    assert verifier.verify(fresh).subject == "app-a"


def test_jwks_with_key_ids(tmp_path: Path) -> None:
    first, _ = _key()
    second, _ = _key()
    keys = []
    for kid, key in (("k1", first), ("k2", second)):
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    verifier = TokenVerifier(jwt_keys=path)
    assert verifier.verify(_token(second, kid="k2")).subject == "app-a"
    with pytest.raises(InvalidToken, match="signature"):
        verifier.verify(_token(first, kid="k2"))
    with pytest.raises(InvalidToken, match="kid"):
        verifier.verify(_token(first, kid="k9"))
    with pytest.raises(InvalidToken, match="not a JWT"):
        verifier.verify("opaque")


def test_unsigned_tokens_are_refused(tmp_path: Path) -> None:
    _, pem = _key()
    (tmp_path / "keys.pem").write_bytes(pem)
    verifier = TokenVerifier(jwt_keys=tmp_path / "keys.pem")
    unsigned = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, "", algorithm="none")
    with pytest.raises(InvalidToken):
        verifier.verify(unsigned)


def test_dev_and_static_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps({"t-1": {"subject": "app-a", "scopes": ["classify"], "tenants": ["school-a"]}})
    )
    verifier = TokenVerifier(static_tokens=path, dev_token="dev-secret")
    assert verifier.verify("t-1") == Principal("app-a", frozenset({"classify"}), frozenset({"school-a"}))
    dev = verifier.verify("dev-secret")
    assert dev.allows(Scope.ADMIN) and dev.acts_for("anyone")
    with pytest.raises(InvalidToken, match="not one of this server's tokens"):
        verifier.verify("t-2")


def test_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # its own bucket
    now[0] = 0.5
    assert limiter.take("a") == 0.0  # one token back after 1/rate
    assert limiter.take("a") == pytest.approx(0.5)
    now[0] = 100.0
    assert [limiter.take("a") for _ in range(4)][-1] > 0.0  # refills to the burst, not beyond
    small = RateLimiter(1.0, 1, max_callers=2, clock=lambda: now[0])
    for caller in "xyz":
        small.take(caller)
    assert len(small._buckets) == 2


def test_settings(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettings, match="go together"):
        SecuritySettings.from_env({"SNAPLEARN_TLS_CERT": "cert.pem"})
    with pytest.raises(InvalidSettings, match="needs tls_cert"):
        SecuritySettings.from_env({}, tls_client_ca=tmp_path / "ca.pem")
    settings = SecuritySettings.from_env(
        {"SNAPLEARN_AUTH_DEV_TOKEN": "s3cret", "SNAPLEARN_RATE_LIMIT_PER_S": "5"}
    )
    assert settings.authentication and "s3cret" not in repr(settings)
    assert SecuritySettings.flag_of("auth_dev_token") is None  # a secret has no flag
    plain = ServerSecurity.from_settings(SecuritySettings.from_env({}))
    assert plain.credentials is None and plain.interceptors == []
    assert plain.describe("127.0.0.1").startswith("plaintext, no authentication (localhost development only")
    assert "NOT SAFE" in plain.describe("0.0.0.0")
    secured = ServerSecurity.from_settings(settings)
    assert secured.describe("0.0.0.0") == "plaintext, bearer tokens required"


def test_user_ids_of_each_request_kind() -> None:
    from snaplearn.recommender.v1 import recommender_pb2
    from snaplearn.vision.v1 import vision_pb2
    from snaplearn_common.security.interceptor import user_ids_of
    from snaplearn_oip import grpc_service_pb2 as oip

    assert list(user_ids_of(recommender_pb2.RecordFeedbackRequest(user_id="a/1"))) == ["a/1"]
    assert list(user_ids_of(recommender_pb2.SimilarItemsRequest(item_id="i"))) == []
    items = [
        vision_pb2.ClassifyStreamItem(id=n, request=vision_pb2.ClassifyRequest(user_id=user))
        for n, user in enumerate(["a/1", "b/2"])
    ]
    assert list(user_ids_of(vision_pb2.ClassifyStreamRequest(items=items))) == ["a/1", "b/2"]
    infer = oip.ModelInferRequest(model_name="m")
    assert list(user_ids_of(infer)) == []
    infer.parameters["user_id"].string_param = "c/3"
    assert list(user_ids_of(infer)) == ["c/3"]
