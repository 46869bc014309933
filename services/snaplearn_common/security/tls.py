"""Server TLS credentials whose certificate and key files are read again when they change.

grpc asks the fetcher for a certificate configuration at every new handshake; the fetcher
compares the files' modification time and size with the last ones read and returns a new
configuration only when they changed, so a renewed certificate (cert-manager rewriting a
mounted Secret) is served from the next connection on, without a restart. Connections
already open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int], ...]


class ReloadingServerCredentials:
    """The PEM files of a server's TLS (and the client CA for mutual TLS), watched for changes."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self._paths = [cert, key] + ([client_ca] if client_ca is not None else [])
        self._mutual = client_ca is not None
        self._lock = threading.Lock()
        self._stamp: _Stamp = ()
        self.reloads = 0  # configurations handed to grpc after the first
        initial = self._read()
        if initial is None:
            raise ValueError("TLS certificate, key or client CA file is empty")
        self._initial, self._stamp = initial

    def _stamps(self) -> _Stamp:
        stamps = []
        for path in self._paths:
            stat = os.stat(path)
            stamps.append((stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def _read(self) -> tuple[grpc.ServerCertificateConfiguration, _Stamp] | None:
        stamp = self._stamps()
        contents = [path.read_bytes() for path in self._paths]
        if not all(contents) or stamp != self._stamps():
            return None  # a file being written: try again at the next handshake
        cert, key = contents[0], contents[1]
        client_ca = contents[2] if self._mutual else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca), stamp

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate configuration fetcher: None keeps the current configuration."""
        try:
            with self._lock:
                if self._stamps() == self._stamp:
                    return None
                fresh = self._read()
                if fresh is None:
                    return None
                configuration, self._stamp = fresh
                self.reloads += 1
        except OSError as error:
            log.warning("TLS files not readable (%s); keeping the current certificate", error.strerror)
            return None
        log.info("TLS certificate files changed; new connections get the new certificate")
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self._mutual
        )
