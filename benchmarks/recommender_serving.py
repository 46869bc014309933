"""Recommend / SimilarItems serving at catalog scale, before vs after, in one run.

    python benchmarks/recommender_serving.py [--items 100000] [--seconds 10] [--concurrency 64]

Builds a RecommenderModel over a synthetic catalog of --items items, applies --events events
(so there are real users with seen items), then measures, side by side:
(a) core latency (Snapshot.recommend, k=20) with no filters, grade+format filters, exclude_seen;
    "before" is the pre-optimisation algorithm (kept below as `baseline_recommend`) with the
    process's default BLAS threads, "after" is Snapshot.recommend with BLAS single-threaded
    (what RecommendationService sets);
(b) server-side handler latency, timed by a server interceptor, while (c) a grpc.aio client in
    ANOTHER process (this script with --client) drives a real gRPC server in this process with
    --concurrency concurrent calls for --seconds; requests/s counts calls completed in the window.
Writes docs/benchmarks/recommender_serving.md. Timings on a shared machine are noisy: compare
rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio
from threadpoolctl import threadpool_info, threadpool_limits

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_common.server import start_grpc_server
from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_recommender.bench import synthetic_events
from snaplearn_recommender.catalog import FORMATS, MAX_GRADE, MIN_GRADE, Catalog, LearningItem
from snaplearn_recommender.model import RecommenderModel
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.servicer import SERVICE_NAME, add_to_server
from snaplearn_recommender.snapshot import RecommendResult, Snapshot, _reason

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "benchmarks" / "recommender_serving.md"
K = 20
USERS = 2_000
CASES: dict[str, dict[str, Any]] = {
    "no filters": {},
    "grade 5 + video": {"grades": (5,), "formats": ("video",)},
    "exclude_seen": {"exclude_seen": True},
}


def big_catalog(n_items: int, seed: int = 0) -> Catalog:
    """n_items items: random grade and format, one topic each (every 4th item two topics)."""
    rng = np.random.default_rng(seed)
    grades = rng.integers(MIN_GRADE, MAX_GRADE + 1, n_items)
    formats = rng.integers(len(FORMATS), size=n_items)
    topics = rng.integers(len(DEFAULT_TOPICS), size=(n_items, 2))
    items = []
    for i in range(n_items):
        first, second = DEFAULT_TOPICS[topics[i, 0]], DEFAULT_TOPICS[topics[i, 1]]
        concepts = (first, second) if i % 4 == 3 and first != second else (first,)
        items.append(
            LearningItem(
                item_id=f"item-{i:06d}",
                title=f"{first} practice {i} ({FORMATS[formats[i]]}, grade {grades[i]})",
                concepts=concepts,
                grade=int(grades[i]),
                format=FORMATS[formats[i]],
                difficulty=1 + i % 5,
            )
        )
    return Catalog(items)


def baseline_recommend(
    snapshot: Snapshot,
    user_id: str,
    k: int = 0,
    exclude_seen: bool = False,
    grades: Collection[int] = (),
    formats: Collection[str] = (),
    concepts: Collection[str] = (),
) -> RecommendResult:
    """The algorithm Snapshot.recommend used before this benchmark (validation elided)."""
    k = k or 10
    allowed = np.ones(snapshot.n_items, dtype=bool)
    if grades:
        allowed &= np.isin(snapshot.item_grades, np.fromiter(grades, dtype=np.int64))
    if formats:
        allowed &= np.isin(snapshot.item_format_codes, np.array([FORMATS.index(f) for f in formats]))
    if concepts:
        columns = [snapshot.concepts.index(c) for c in concepts]
        allowed &= snapshot.concept_membership[:, columns].any(axis=1)
    user_row = snapshot.user_index.get(user_id)
    if user_row is None:
        scores = np.log1p(snapshot.popularity) + 1e-3 * snapshot.item_biases
    else:
        scores = snapshot.item_vectors @ snapshot.user_vectors[user_row] + snapshot.item_biases
        seen = snapshot.seen_items.get(user_row) if exclude_seen else None
        if seen is not None and len(seen):
            allowed[seen] = False
    masked = np.where(allowed, scores, -np.inf).astype(np.float32)
    k = min(k, int(np.count_nonzero(allowed)))
    candidates = np.argpartition(-masked, k - 1)[:k]
    top = candidates[np.lexsort((candidates, -masked[candidates]))]
    interests = () if user_row is None else snapshot.top_concepts(user_id)
    items = tuple(
        snapshot._item(int(p), float(masked[p]), _reason(snapshot.catalog[int(p)].concepts, interests))
        for p in top
    )
    return RecommendResult(user_id, items, snapshot.version, user_row is None, snapshot.events_applied)


class BaselineService(RecommendationService):
    def recommend(self, user_id: str, k: int = 0, exclude_seen: bool = False, **filters: Any) -> Any:
        return baseline_recommend(self.snapshot, user_id, k, exclude_seen, **filters)


def percentiles_ms(seconds: list[float] | np.ndarray) -> dict[str, float]:
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


def core_latency(recommend: Callable[..., Any], requests: int, **kwargs: Any) -> dict[str, float]:
    latencies = []
    for i in range(requests):
        started = time.perf_counter()
        recommend(f"user-{i % USERS}", K, **kwargs)
        latencies.append(time.perf_counter() - started)
    return percentiles_ms(latencies)


class HandlerTimer(aio.ServerInterceptor):
    """Records (wall end time, handler seconds) per unary call: the server-side latency."""

    def __init__(self) -> None:
        self.records: list[tuple[float, float]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def timed(request: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                return await inner(request, context)
            finally:
                self.records.append((time.time(), time.perf_counter() - started))

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def serve_and_load(service: RecommendationService, args: argparse.Namespace) -> dict[str, Any]:
    timer = HandlerTimer()
    server = await start_grpc_server(
        [functools.partial(add_to_server, service)], [SERVICE_NAME], interceptors=[timer]
    )
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            f"127.0.0.1:{server.port}",
            "--concurrency",
            str(args.concurrency),
            "--seconds",
            str(args.seconds),
            stdout=subprocess.PIPE,
        )
        out, _ = await client.communicate()
        result: dict[str, Any] = json.loads(out)
    finally:
        await server.stop(1.0)
    window = [d for end, d in timer.records if result["window_start"] <= end <= result["window_end"]]
    result["server_handler_ms"] = percentiles_ms(window) if window else {}
    return result


async def client_main(target: str, concurrency: int, seconds: float, warmup_s: float = 2.0) -> None:
    async with aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
        await channel.channel_ready()
        start = time.time() + warmup_s
        end = start + seconds
        latencies: list[float] = []
        errors = 0

        async def caller(number: int) -> None:
            nonlocal errors
            i = number
            while (now := time.time()) < end:
                request = recommender_pb2.RecommendRequest(user_id=f"user-{i % USERS}", k=K)
                i += concurrency
                try:
                    await stub.Recommend(request, timeout=10)
                except grpc.RpcError:
                    errors += 1
                    continue
                if now >= start and time.time() <= end:
                    latencies.append(time.time() - now)

        await asyncio.gather(*(caller(n) for n in range(concurrency)))
    print(
        json.dumps(
            {
                "window_start": start,
                "window_end": end,
                "completed": len(latencies),
                "errors": errors,
                "requests_per_s": round(len(latencies) / seconds, 1),
                "client_ms": percentiles_ms(latencies),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2_000, help="per core-latency case")
    parser.add_argument("--seconds", type=float, default=10.0, help="gRPC load window per variant")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main(args.client, args.concurrency, args.seconds))
        return 0

    default_blas = max(
        (pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=1
    )
    started = time.perf_counter()
    model = RecommenderModel(big_catalog(args.items))
    events = synthetic_events(args.events, USERS)
    for first in range(0, len(events), 1000):
        model.apply(events[first : first + 1000])
    setup_s = time.perf_counter() - started
    build_s = []
    for _ in range(5):
        started = time.perf_counter()
        snapshot = model.snapshot()
        build_s.append(time.perf_counter() - started)
    print(f"model with {model.n_items} items, {model.n_users} users in {setup_s:.1f} s", file=sys.stderr)

    core: dict[str, dict[str, dict[str, float]]] = {}
    for label, kwargs in CASES.items():
        with threadpool_limits(limits=default_blas, user_api="blas"):
            before = core_latency(functools.partial(baseline_recommend, snapshot), args.requests, **kwargs)
        with threadpool_limits(limits=1, user_api="blas"):
            before_1 = core_latency(functools.partial(baseline_recommend, snapshot), args.requests, **kwargs)
            after = core_latency(snapshot.recommend, args.requests, **kwargs)
        core[label] = {"before": before, "before, 1 BLAS thread": before_1, "after": after}
        print(label, core[label], file=sys.stderr)
    with threadpool_limits(limits=1, user_api="blas"):
        items = [snapshot.catalog[i].item_id for i in range(0, args.items, max(1, args.items // 1000))]
        similar = []
        for item_id in items:
            started = time.perf_counter()
            snapshot.similar_items(item_id, K)
            similar.append(time.perf_counter() - started)

    load = {}
    for label, service_type in (("before", BaselineService), ("after", RecommendationService)):
        service = service_type(snapshot)  # sets BLAS to 1 thread ...
        if service_type is BaselineService:
            threadpool_limits(limits=default_blas, user_api="blas")  # ... which "before" did not
        load[label] = asyncio.run(serve_and_load(service, args))
        print(label, load[label], file=sys.stderr)
    write_report(args, default_blas, build_s, core, percentiles_ms(similar), load)
    return 0


def write_report(
    args: argparse.Namespace,
    default_blas: int,
    build_s: list[float],
    core: dict[str, dict[str, dict[str, float]]],
    similar: dict[str, float],
    load: dict[str, dict[str, Any]],
) -> None:
    def row(name: str, p: dict[str, float]) -> str:
        return f"| {name} | {p.get('p50', float('nan'))} | {p.get('p95', float('nan'))} | {p.get('p99')} |"

    lines = [
        "# Recommender serving at catalog scale",
        "",
        f"Command: `python benchmarks/recommender_serving.py --items {args.items} --events {args.events} "
        f"--seconds {args.seconds:g} --concurrency {args.concurrency}`  ",
        f"Machine: {os.cpu_count()} cores (shared), load average at the end {os.getloadavg()[0]:.1f}; "
        f"default BLAS threads {default_blas}. k = {K}, {USERS} users.",
        "",
        f"Snapshot build (model.snapshot(), incl. per-snapshot precomputation): median "
        f"{np.median(build_s) * 1e3:.0f} ms over {len(build_s)} builds.",
        "",
        "## (a) Core latency, ms (Snapshot.recommend, one thread, no gRPC)",
        "",
        "| case / implementation | p50 | p95 | p99 |",
        "|---|---|---|---|",
    ]
    for label, variants in core.items():
        lines += [row(f"{label}: {variant}", p) for variant, p in variants.items()]
    lines += [row("SimilarItems (after)", similar), ""]
    lines += [
        "## (b, c) Through a real gRPC server (Recommend, no filters, k = 20)",
        "",
        f"Client: grpc.aio in another process, {args.concurrency} concurrent calls, "
        f"{args.seconds:g} s window after a 2 s warm-up. Server-side = handler time measured by a "
        "server interceptor (after deserialisation, before serialisation).",
        "",
        "| implementation | requests/s | errors | server p50 | server p95 | server p99 "
        "| client p50 | client p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, result in load.items():
        server, client = result["server_handler_ms"], result["client_ms"]
        lines.append(
            f"| {label} | {result['requests_per_s']} | {result['errors']} | {server.get('p50')} "
            f"| {server.get('p95')} | {server.get('p99')} | {client['p50']} | {client['p99']} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    existing = OUT.read_text() if OUT.exists() else ""
    notes = existing[existing.index("## Notes") :] if "## Notes" in existing else ""
    OUT.write_text("\n".join(lines) + "\n\n" + notes)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
