"""A port another process already holds, said in one sentence (no gRPC here).

A server started by hand on a busy port should say which port and what to do, not print a
traceback: `check_free` probes the ports a server is about to bind before it loads anything,
and `PortInUse` is what the servers' bootstraps raise when a bind fails because of it; each
command's main prints it and exits 2.
"""

from __future__ import annotations

import contextlib
import errno
import socket


class PortInUse(OSError):
    """host:port is held by another process."""

    def __init__(self, host: str, port: int, flag: str = "--port") -> None:
        self.host, self.port, self.flag = host, port, flag
        self.sentence = (
            f"port {port} is already in use: another process is listening on {host}:{port} "
            f"(stop it, or choose another port with {flag})"
        )
        super().__init__(errno.EADDRINUSE, self.sentence)

    def __str__(self) -> str:
        return self.sentence


def port_is_busy(host: str, port: int, *, reuse_port: bool = False) -> bool:
    """True when binding host:port fails because the address is in use (as gRPC's own bind
    would: SO_REUSEADDR, and SO_REUSEPORT when the server joins a port with its siblings).
    Port 0 is never busy; an address that does not resolve is not this check's to report."""
    if port == 0:
        return False
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return False
    for family, kind, proto, _, address in addresses:
        with contextlib.closing(socket.socket(family, kind, proto)) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return True
    return False


def check_free(host: str, ports: dict[str, int]) -> None:
    """Raise PortInUse for the first of `ports` ({flag: port}) that another process holds."""
    for flag, port in ports.items():
        if port_is_busy(host, port):
            raise PortInUse(host, port, flag)
