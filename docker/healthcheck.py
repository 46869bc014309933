#!/usr/bin/env python3
"""Container health check: exit 0 when a SnapLearn server's grpc.health.v1 answers SERVING.

    snaplearn-healthcheck [--tls-ca CA [--server-name NAME] [--tls-cert C --tls-key K]] HOST:PORT [SERVICE]

SERVICE defaults to "" (the whole server). The servers report NOT_SERVING while the model
loads and while they drain after SIGTERM, so an orchestrator sees both as "not ready".
Kubernetes' native gRPC probe speaks plaintext only, so deploy/ uses it on plaintext pods and
this command (with --tls-ca) where the servers serve TLS (deploy/components/security);
--server-name is a name the server's certificate holds, since the probe dials 127.0.0.1.
Health needs no token (the servers keep it open to probes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, credentials, options=options)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="snaplearn-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("service", nargs="?", default="", help="the grpc.health.v1 service name")
    parser.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (enables TLS)")
    parser.add_argument("--server-name", help="a name in the server's certificate")
    parser.add_argument("--tls-cert", help="client certificate, where the server requires mutual TLS")
    parser.add_argument("--tls-key", help="the client certificate's key")
    args = parser.parse_args(argv[1:])
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and args.tls_ca is None:
        parser.error("--tls-cert needs --tls-ca")
    with channel_for(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=3
            )
        except grpc.RpcError as error:
            print(f"{args.target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
