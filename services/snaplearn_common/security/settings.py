"""SecuritySettings: TLS, tokens, rate limit and reflection of one gRPC server, shared by both servers.

A server's settings nest it (`security: SecuritySettings = Field(default_factory=...)`); its
flags and variables keep their names whatever the server's own prefix:

  --tls-cert PATH / --tls-key PATH      SNAPLEARN_TLS_CERT / SNAPLEARN_TLS_KEY (PEM; reloaded when
                                        they change, at the next handshake)
  --tls-client-ca PATH                  SNAPLEARN_TLS_CLIENT_CA: mutual TLS, clients must present a
                                        certificate signed by this CA
  --auth-jwt-keys PATH                  SNAPLEARN_AUTH_JWT_KEYS: PEM public key(s) or a JWKS file
  --auth-jwt-issuer / --auth-jwt-audience / --auth-jwt-algorithms
  --auth-tokens-file PATH               SNAPLEARN_AUTH_TOKENS_FILE: static tokens (JSON), development
  SNAPLEARN_AUTH_DEV_TOKEN              one static token with every scope and tenant (environment only)
  --rate-limit-per-s R / --rate-limit-burst N
  --rate-limit-table PATH               (hidden) buckets shared by worker processes (D51)
  --reflection / --no-reflection

Nothing set is the zero-config development mode: plaintext, no authentication, and the server
says so in its log at start (docs/DECISIONS.md, D45).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, SecretStr, model_validator

from snaplearn_common.settings import Cli, Settings, SettingsConfigDict, none_for

_GROUP = "security"
_PATH = none_for("")


class SecuritySettings(Settings):
    """TLS, authentication, rate limit and reflection of a gRPC server."""

    model_config = SettingsConfigDict(env_prefix="SNAPLEARN_", env_ignore_empty=True)
    cli_group: ClassVar[str | None] = _GROUP

    tls_cert: Annotated[Path | None, Cli(metavar="PATH"), _PATH] = Field(
        default=None, description="server certificate chain (PEM); with --tls-key turns TLS on"
    )
    tls_key: Annotated[Path | None, Cli(metavar="PATH"), _PATH] = Field(
        default=None, description="server private key (PEM)"
    )
    tls_client_ca: Annotated[Path | None, Cli(metavar="PATH"), _PATH] = Field(
        default=None, description="CA of client certificates: mutual TLS, a client without one is refused"
    )
    auth_jwt_keys: Annotated[Path | None, Cli(metavar="PATH"), _PATH] = Field(
        default=None, description="JWT verification keys: PEM public key(s) or a JWKS JSON file"
    )
    auth_jwt_issuer: Annotated[str | None, Cli(metavar="ISS"), none_for("")] = Field(
        default=None, description="required JWT issuer (iss)"
    )
    auth_jwt_audience: Annotated[str | None, Cli(metavar="AUD"), none_for("")] = Field(
        default=None, description="required JWT audience (aud)"
    )
    auth_jwt_algorithms: Annotated[str, Cli(metavar="ALGS")] = Field(
        default="RS256,ES256,EdDSA", min_length=1, description="accepted JWT algorithms, comma-separated"
    )
    auth_tokens_file: Annotated[Path | None, Cli(metavar="PATH"), _PATH] = Field(
        default=None,
        description='static tokens for development: JSON {"<token>": {"subject": .., "scopes": [..], '
        '"tenants": [..]}}',
    )
    auth_dev_token: Annotated[SecretStr | None, Cli(env_only=True)] = None
    rate_limit_per_s: Annotated[float, Cli(metavar="R")] = Field(
        default=0.0, ge=0, description="calls per second per caller (token bucket; 0 = no limit)"
    )
    rate_limit_burst: Annotated[int, Cli(metavar="N")] = Field(
        default=20, ge=1, description="calls a caller may make at once before the rate applies"
    )
    rate_limit_table: Annotated[Path | None, Cli(hidden=True, metavar="PATH"), _PATH] = Field(
        default=None,
        description="the rate-limit buckets shared by the worker processes of one port (set by the "
        "vision supervisor for its workers; unset: this process's own buckets)",
    )
    reflection: Annotated[bool, Field(description="serve gRPC server reflection")] = True

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> SecuritySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authentication(self) -> bool:
        """True when callers must present a token."""
        sources = (self.auth_jwt_keys, self.auth_tokens_file, self.auth_dev_token)
        return any(source is not None for source in sources)

    def algorithms(self) -> list[str]:
        return [name.strip() for name in self.auth_jwt_algorithms.split(",") if name.strip()]
