"""gRPC server bootstrap shared by the vision server and the recommender.

Every server gets: the error-mapping interceptor, grpc.health.v1 (per-service status
for readiness), server reflection (unless its security settings turn it off), and a graceful
stop that flips health to NOT_SERVING before draining in-flight calls. Its SecuritySettings
add TLS, tokens and a rate limit (snaplearn_common.security); none given is plaintext without
authentication, and the start-up log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from snaplearn_common.grpc_errors import ErrorMappingInterceptor
from snaplearn_common.ports import PortInUse, port_is_busy
from snaplearn_common.security.bootstrap import ServerSecurity
from snaplearn_common.security.settings import SecuritySettings

log = logging.getLogger(__name__)

Registrar = Callable[[aio.Server], None]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class GrpcServer:
    """A started grpc.aio server, the port it bound and its health servicer."""

    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str] = field(default_factory=tuple)
    security: ServerSecurity = field(default_factory=ServerSecurity)

    async def set_serving(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Readiness off first, so load balancers stop sending, then drain."""
        await self.set_serving(False)
        await self.server.stop(grace_s)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_grpc_server(
    registrars: Sequence[Registrar],
    service_names: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 0,
    serving: bool = True,
    max_message_bytes: int = 16 * 1024 * 1024,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    max_connection_age_s: float | None = None,
    max_connection_age_grace_s: float = 30.0,
    maximum_concurrent_rpcs: int | None = None,
    max_pending_calls: int | None = None,
    reuse_port: bool = False,
    security: SecuritySettings | None = None,
) -> GrpcServer:
    """Start a server on host:port (0 picks a free port) and return it with the bound port.

    max_connection_age_s: close each client connection (GOAWAY, then `grace` for in-flight
    calls) after this long. Clients balancing round-robin over a headless Service re-resolve
    DNS only when a connection closes, so without it pods added by a scale-up get no traffic
    from clients that are already connected.

    maximum_concurrent_rpcs: grpc refuses calls beyond this many in flight with
    RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!") before deserialising the request or
    running any interceptor or handler: a backstop under overload, not the informative refusal.

    max_pending_calls: bound grpc's backlog of calls that arrived but that Python has not
    picked up yet (grpc's default sheds from 1,000 and drops all beyond 3,000). Under overload
    that backlog forms before any of our code sees a call, so our queue limits cannot bound
    it: calls wait there for seconds and are then shed. With a bound, grpc sheds them on
    arrival: from max_pending_calls / 2 with rising probability, all beyond max_pending_calls.
    Clients see CANCELLED ("Cancelled"), not RESOURCE_EXHAUSTED: grpc's choice. Keep it well
    above the concurrency of legitimate bursts (docs/DECISIONS.md, D17).

    A port another process holds raises PortInUse (snaplearn_common.ports): one sentence naming
    the port, which the servers' mains print before exiting 2.

    reuse_port: bind with SO_REUSEPORT, so that several processes (worker processes behind
    one port) listen on the same port and the kernel spreads new connections over them. Off
    by default: a second server started on a busy port by mistake should fail, not share it.

    security: TLS (mutual as an option, files reloaded when they change), bearer tokens with
    scopes and the tenant rule, a per-caller rate limit, reflection on or off. Its interceptor
    runs first, so a refused call reaches nothing else.
    """
    protection = ServerSecurity.from_settings(security)
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if max_connection_age_s is not None:
        if max_connection_age_s <= 0 or max_connection_age_grace_s < 0:
            raise ValueError("max_connection_age_s must be > 0 and its grace >= 0")
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_s * 1000)),
        ]
    if max_pending_calls is not None:
        if max_pending_calls < 2:
            raise ValueError(f"max_pending_calls must be >= 2, got {max_pending_calls}")
        options += [
            ("grpc.server.max_pending_requests", max_pending_calls // 2),
            ("grpc.server.max_pending_requests_hard_limit", max_pending_calls),
        ]
    if maximum_concurrent_rpcs is not None and maximum_concurrent_rpcs < 1:
        raise ValueError(f"maximum_concurrent_rpcs must be >= 1, got {maximum_concurrent_rpcs}")
    server = aio.server(
        interceptors=[*protection.interceptors, ErrorMappingInterceptor(), *interceptors],
        options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    for register in registrars:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if protection.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([*service_names, health_name, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    # Checked first so that a busy port is one sentence (PortInUse), not grpc's bind error.
    if port_is_busy(host, port, reuse_port=reuse_port):
        raise PortInUse(host, port)
    try:
        if protection.credentials is not None:
            bound = server.add_secure_port(address, protection.credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as error:  # grpc's "Failed to bind to address ..."
        if port_is_busy(host, port, reuse_port=reuse_port):  # taken between the check and the bind
            raise PortInUse(host, port) from None
        raise OSError(f"could not bind gRPC server to {host}:{port}: {error}") from None
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {host}:{port}")
    await server.start()
    grpc_server = GrpcServer(
        server=server, port=bound, health=health_servicer, service_names=service_names, security=protection
    )
    await grpc_server.set_serving(serving)
    log.info(
        "gRPC server listening on %s:%d (%s): %s",
        host,
        bound,
        ", ".join(service_names),
        protection.describe(host),
    )
    return grpc_server
