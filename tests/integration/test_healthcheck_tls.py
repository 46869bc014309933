"""The container health check (docker/healthcheck.py) probes a server that serves mutual TLS and
requires tokens: the deploy/components/security probes depend on it, since Kubernetes' native
gRPC probe speaks plaintext only."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from snaplearn_common.security.settings import SecuritySettings
from snaplearn_common.server import start_grpc_server
from tests.helpers.certificates import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
SERVICE = "snaplearn.recommender.v1.RecommenderService"


async def _probe(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "docker/healthcheck.py"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_probe_over_mutual_tls_sees_serving_without_a_token(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    ca.issue("localhost", server=True).write(tmp_path / "tls.crt", tmp_path / "tls.key")
    ca.issue("probe", server=False).write(tmp_path / "probe.crt", tmp_path / "probe.key")
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"a-token": {"subject": "app", "scopes": ["recommend"], "tenants": ["*"]}}')
    security = SecuritySettings.from_env(
        {},
        tls_cert=tmp_path / "tls.crt",
        tls_key=tmp_path / "tls.key",
        tls_client_ca=ca_file,
        auth_tokens_file=tokens,
    )
    server = await start_grpc_server([], [SERVICE], security=security)
    try:
        target = f"127.0.0.1:{server.port}"
        tls = ["--tls-ca", str(ca_file), "--server-name", "localhost"]
        client = ["--tls-cert", str(tmp_path / "probe.crt"), "--tls-key", str(tmp_path / "probe.key")]

        code, output = await _probe(*tls, *client, target, SERVICE)
        assert (code, output.strip()) == (0, f"{target} {SERVICE}: SERVING")

        code, output = await _probe(*tls, *client, target, "no.such.Service")
        assert code == 1 and "NOT_FOUND" in output

        # Plaintext, a CA that did not sign the server, or no client certificate: not healthy.
        code, output = await _probe(target, SERVICE)
        assert code == 1 and "UNAVAILABLE" in output
        other_ca = tmp_path / "other-ca.crt"
        other_ca.write_bytes(CertificateAuthority("another CA").cert_pem)
        code, output = await _probe("--tls-ca", str(other_ca), "--server-name", "localhost", *client, target)
        assert code == 1 and "UNAVAILABLE" in output
        code, output = await _probe(*tls, target, SERVICE)
        assert code == 1 and "UNAVAILABLE" in output

        code, output = await _probe("--tls-cert", "c.pem", "--tls-key", "k.pem", target)
        assert code == 2 and "--tls-cert needs --tls-ca" in output
    finally:
        await server.stop(0)
