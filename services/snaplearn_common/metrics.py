"""Prometheus metrics: each process owns a registry and serves it on an HTTP port.

A registry per server object (not the global default) keeps tests that start several
servers in one process independent.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


@dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: Thread
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> MetricsEndpoint:
    """Serve `registry` at http://host:port/metrics; port 0 picks a free port."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server=server, thread=thread, port=server.server_port)


# Latency buckets in seconds, from sub-millisecond cache hits to multi-second overloads.
# Finest where a batching server's latency targets and tails lie (a batching delay plus a few
# batch computes), so that a p99 interpolated inside one bucket stays close to the true one.
# The Go gateway's histogram uses the same bounds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> dict[str, float]:
    """One read of a /metrics endpoint as {sample name with labels: value} (tests, benchmarks)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
