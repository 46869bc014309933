#!/usr/bin/env python3
"""Container health check: exit 0 when a SnapLearn server's grpc.health.v1 answers SERVING.

    snaplearn-healthcheck HOST:PORT [SERVICE]

SERVICE defaults to "" (the whole server). The servers report NOT_SERVING while the model
loads and while they drain after SIGTERM, so an orchestrator sees both as "not ready".
Kubernetes does not need this (deploy/ uses its native gRPC probes); Docker and Compose do.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    target, service = argv[1], argv[2] if len(argv) == 3 else ""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3
            )
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
