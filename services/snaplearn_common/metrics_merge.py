"""One /metrics for several worker processes: scrape each worker's endpoint and add them up.

Worker processes behind one port (snaplearn_vision.workers) each keep an ordinary
in-process registry, so the hot path pays nothing for being one of several; the
supervisor serves a registry whose only collector reads every worker's text exposition
when Prometheus scrapes and sums it series by series:

- counters, histograms (buckets, _sum, _count) and gauges are added: a pod's request
  rate, latency distribution, queue depth and queue capacity are the sums of its workers'
  (so ratios such as queue_depth / queue_capacity keep their meaning);
- `_created` timestamps take the earliest worker's.

A worker that cannot be scraped is left out of that scrape and counted in
`<prefix>_worker_scrape_failures_total`. prometheus_client's multiprocess mode was the
alternative; it moves every metric update onto mmap'd files and needs per-gauge modes,
for a result Prometheus would compute the same way (docs/DECISIONS.md, D18).
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]


def merge_expositions(texts: Iterable[str]) -> list[Metric]:
    """Sum the text expositions of several processes into one list of metric families."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, Labels], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            elif merged.type != family.type:
                raise ValueError(
                    f"metric {family.name} is a {merged.type} in one worker, a {family.type} in another"
                )
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = samples.get(key)
                if seen is None:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(seen, sample.value)
                else:
                    samples[key] = seen + sample.value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def fetch_exposition(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


class WorkerMetricsCollector(Collector):
    """Collects the sum of the workers' metrics; `worker_urls` is asked at every scrape.

    A callable rather than a list: workers restart on new ports.
    """

    def __init__(self, worker_urls: Callable[[], Sequence[str]], failures: Counter) -> None:
        self._worker_urls = worker_urls
        self._failures = failures

    def describe(self) -> list[Metric]:
        # Nothing to declare up front (and registering must not scrape workers).
        return []

    def collect(self) -> Iterator[Metric]:
        texts = []
        for url in self._worker_urls():
            try:
                texts.append(fetch_exposition(url))
            except OSError as exc:  # a worker restarting or gone: leave it out of this scrape
                log.warning("could not scrape worker metrics at %s: %s", url, exc)
                self._failures.inc()
        yield from merge_expositions(texts)


def worker_metrics_registry(prefix: str, worker_urls: Callable[[], Sequence[str]]) -> CollectorRegistry:
    """A registry serving the workers' summed metrics plus the supervisor's scrape failures."""
    registry = CollectorRegistry(auto_describe=False)
    failures = Counter(
        f"{prefix}_worker_scrape_failures",
        "Scrapes of a worker process's metrics that failed (that worker was left out of the sum).",
        registry=None,
    )
    # Collected in registration order: the workers first, so a failure shows in the same scrape.
    registry.register(WorkerMetricsCollector(worker_urls, failures))
    registry.register(failures)
    return registry
