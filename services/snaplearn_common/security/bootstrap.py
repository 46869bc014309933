"""ServerSecurity: what a server's SecuritySettings ask for, built for start_grpc_server."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from grpc import aio

from snaplearn_common.security.interceptor import SecurityInterceptor
from snaplearn_common.security.ratelimit import Limiter, RateLimiter, SharedRateLimiter
from snaplearn_common.security.settings import SecuritySettings
from snaplearn_common.security.tls import ReloadingServerCredentials
from snaplearn_common.security.tokens import TokenVerifier

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class ServerSecurity:
    """What one server's settings ask for, built: TLS credentials (None: plaintext), the
    interceptors, and whether to serve reflection."""

    credentials: grpc.ServerCredentials | None = None
    tls: ReloadingServerCredentials | None = None
    interceptors: list[aio.ServerInterceptor] = field(default_factory=list)
    reflection: bool = True
    authentication: bool = False
    mutual_tls: bool = False

    @classmethod
    def from_settings(cls, settings: SecuritySettings | None) -> ServerSecurity:
        """Reads the certificate and key files now: a missing or broken one fails the start."""
        if settings is None:
            return cls()
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = ReloadingServerCredentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        verifier = None
        if settings.authentication:
            dev = settings.auth_dev_token.get_secret_value() if settings.auth_dev_token is not None else None
            verifier = TokenVerifier(
                jwt_keys=settings.auth_jwt_keys,
                issuer=settings.auth_jwt_issuer,
                audience=settings.auth_jwt_audience,
                algorithms=settings.algorithms(),
                static_tokens=settings.auth_tokens_file,
                dev_token=dev or None,
            )
        limiter: Limiter | None = None
        if settings.rate_limit_per_s > 0 and settings.rate_limit_table is not None:
            # One of several worker processes on one port: one bucket per caller for all of them.
            limiter = SharedRateLimiter(
                settings.rate_limit_table, settings.rate_limit_per_s, settings.rate_limit_burst
            )
        elif settings.rate_limit_per_s > 0:
            limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        interceptors: list[aio.ServerInterceptor] = []
        if verifier is not None or limiter is not None:
            interceptors.append(SecurityInterceptor(verifier, limiter))
        return cls(
            credentials=tls.credentials() if tls is not None else None,
            tls=tls,
            interceptors=interceptors,
            reflection=settings.reflection,
            authentication=verifier is not None,
            mutual_tls=settings.tls_client_ca is not None,
        )

    def describe(self, host: str) -> str:
        """One line for the start-up log: what protects this port."""
        if self.credentials is None and not self.authentication:
            where = "localhost development only" if host in _LOOPBACK else "NOT SAFE beyond a trusted network"
            return (
                f"plaintext, no authentication ({where}; set --tls-cert/--tls-key and "
                "--auth-jwt-keys or --auth-tokens-file to secure it)"
            )
        transport = "plaintext" if self.credentials is None else "mutual TLS" if self.mutual_tls else "TLS"
        auth = "bearer tokens required" if self.authentication else "no authentication"
        return f"{transport}, {auth}"
