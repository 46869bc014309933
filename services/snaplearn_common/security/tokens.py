"""Bearer tokens to Principals: JWTs verified with PyJWT against keys from a file, and static
tokens for development. No gRPC here.

A JWT names its caller in `sub`, its scopes in `scope` (space-separated, OAuth 2.0) or `scp`
(a list), its tenants in `tenants` (a list) or `tenant` (one). `exp` is required. The key file
is either PEM (one or more public keys: a key rotation lists the old and the new) or a JWKS
JSON document; a token whose header names a `kid` is checked against that key only. The file
is read again when it changes, so keys rotate without a restart.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from snaplearn_common.security.principal import ALL_SCOPES, ANY_TENANT, Principal

log = logging.getLogger(__name__)

_PEM_KEY = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)
_CACHE_SIZE = 4096


class InvalidToken(Exception):
    """The token is not one this server accepts; the message says why, without the token."""


def _strings(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(str(item) for item in value)
    return frozenset()


def principal_from_claims(claims: Mapping[str, Any], expires_at: float | None = None) -> Principal:
    subject = claims.get("sub") or claims.get("subject")
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("the token names no subject (sub)")
    scopes = _strings(claims.get("scope")) | _strings(claims.get("scp")) | _strings(claims.get("scopes"))
    tenants = _strings(claims.get("tenants"))
    tenant = claims.get("tenant")
    if isinstance(tenant, str) and tenant:
        tenants |= {tenant}
    return Principal(subject=subject, scopes=scopes, tenants=tenants, expires_at=expires_at)


class _WatchedFile:
    """A file's parsed content, parsed again when its modification time or size changes."""

    def __init__(self, path: Path, parse: Any) -> None:
        self._path = path
        self._parse = parse
        self._stamp: tuple[int, int] | None = None
        self._value: Any = None
        self.version = 0  # counts the parses that took effect
        self._lock = threading.Lock()
        self.get()  # a missing or broken file fails the start, not the first call

    def get(self) -> Any:
        stat = os.stat(self._path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return self._value
        with self._lock:
            if stamp != self._stamp:
                try:
                    value = self._parse(self._path.read_bytes())
                except Exception:
                    if self._stamp is None:
                        raise
                    # A file being rewritten: keep what worked until it parses again.
                    log.warning("%s no longer parses; keeping the previous version", self._path.name)
                    return self._value
                self._value, self._stamp = value, stamp
                self.version += 1
        return self._value


def _parse_keys(data: bytes) -> tuple[dict[str, Any], list[Any]]:
    """(keys by kid, keys without kid) from a JWKS document or PEM public keys."""
    text = data.strip()
    if text.startswith(b"{"):
        by_kid: dict[str, Any] = {}
        anonymous: list[Any] = []
        for jwk in jwt.PyJWKSet.from_json(text.decode()).keys:
            if jwk.key_id:
                by_kid[jwk.key_id] = jwk.key
            else:
                anonymous.append(jwk.key)
        return by_kid, anonymous
    keys = [load_pem_public_key(block) for block in _PEM_KEY.findall(text)]
    if not keys:
        raise ValueError("no public key in the key file (PEM 'BEGIN PUBLIC KEY' blocks or a JWKS)")
    return {}, keys


def _parse_static(data: bytes) -> dict[str, Principal]:
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError('static tokens: a JSON object {"<token>": {"subject": ...}}')
    return {str(token): principal_from_claims(claims) for token, claims in document.items()}


class TokenVerifier:
    """Turns a bearer token into a Principal, or raises InvalidToken."""

    def __init__(
        self,
        *,
        jwt_keys: Path | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        algorithms: Sequence[str] = ("RS256", "ES256", "EdDSA"),
        static_tokens: Path | None = None,
        dev_token: str | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        self._keys = None if jwt_keys is None else _WatchedFile(jwt_keys, _parse_keys)
        self._static = None if static_tokens is None else _WatchedFile(static_tokens, _parse_static)
        self._dev_token = dev_token
        self._issuer = issuer
        self._audience = audience
        self._algorithms = list(algorithms)
        self._leeway_s = leeway_s
        # Verified JWTs until they expire: a signature check per call is the cost to avoid.
        self._cache: dict[str, Principal] = {}
        self._cache_version = 0  # of the key file the cached tokens were verified with

    @property
    def leeway_s(self) -> float:
        """Seconds past a JWT's exp that it is still accepted (clock skew)."""
        return self._leeway_s

    def verify(self, token: str) -> Principal:
        if self._dev_token is not None and hmac.compare_digest(token.encode(), self._dev_token.encode()):
            return Principal("dev", scopes=frozenset(ALL_SCOPES), tenants=frozenset({ANY_TENANT}))
        if self._static is not None:
            for known, principal in self._static.get().items():
                if hmac.compare_digest(token.encode(), known.encode()):
                    return principal
        if self._keys is None:
            raise InvalidToken("the token is not one of this server's tokens")
        self._keys.get()
        if self._keys.version != self._cache_version:
            self._cache.clear()  # keys rotated: a token of a removed key must fail from now on
            self._cache_version = self._keys.version
        cached = self._cache.get(token)
        if cached is not None and cached.expires_at is not None and cached.expires_at > time.time():
            return cached
        principal = self._verify_jwt(token)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = principal
        return principal

    def _verify_jwt(self, token: str) -> Principal:
        assert self._keys is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken("the token is not a JWT") from error
        by_kid, anonymous = self._keys.get()
        kid = header.get("kid")
        if kid is not None and kid in by_kid:
            candidates = [by_kid[kid]]
        elif kid is not None and by_kid:
            raise InvalidToken("the token's signing key (kid) is not one of this server's keys")
        else:
            candidates = [*anonymous, *by_kid.values()]
        last: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=self._algorithms,
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway_s,
                    options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
                )
            except jwt.InvalidSignatureError as error:
                last = error
                continue
            except jwt.ExpiredSignatureError as error:
                raise InvalidToken("the token has expired") from error
            except jwt.PyJWTError as error:
                raise InvalidToken(f"the token was refused: {error}") from error
            return principal_from_claims(claims, expires_at=float(claims["exp"]))
        raise InvalidToken("the token's signature does not verify") from last
