"""Recommend / SimilarItems serving at catalog scale, before vs after, in one run.

    python benchmarks/recommender_serving.py [--items 100000] [--seconds 10] [--concurrency 64]
    python benchmarks/recommender_serving.py --snapshot-store [--events 20000] [--repeats 7]

Builds a RecommenderModel over a synthetic catalog of --items items, applies --events events
(so there are real users with seen items), then measures, side by side:
(a) core latency (Snapshot.recommend, k=20) with no filters, grade+format filters, exclude_seen;
    "before" is the pre-optimisation algorithm (kept below as `baseline_recommend`) with the
    process's default BLAS threads, "after" is Snapshot.recommend with BLAS single-threaded
    (what RecommendationService sets);
(b) server-side handler latency, timed by a server interceptor, while (c) a load generator in
    ANOTHER process drives a real gRPC server in this process with --concurrency concurrent
    calls for --seconds; requests/s counts calls completed in the window. Two load generators:
    a grpc.aio client (this script with --client) and, when it is installed, ghz (Go; `go install
    github.com/bojand/ghz/cmd/ghz@latest`), which needs several times less CPU per call, so more
    of the 2 cores is left to the server. Server and client CPU per request (process CPU time /
    calls) are reported beside req/s: on a shared machine they are steadier than req/s;
(d) the same core behind a sync grpc.server (thread pool) instead of grpc.aio, driven by ghz;
(e) micro-batching cost model: one (B, d+1) x (d+1, n_items) GEMM vs B matvecs.
Writes docs/benchmarks/recommender_serving.md. Timings on a shared machine are noisy: compare
rows of one run, not runs.

--snapshot-store instead measures what scale-out costs per snapshot version, side by side:
model.snapshot() (what the trainer does after every micro-batch anyway), SnapshotStore.publish
(pickle + sha256 + write + fsync + rename + LATEST) and SnapshotStore.load (read + verify +
unpickle + the snapshot's derived arrays), into a temporary directory on the local disk, with
the catalog section cached (steady state) and new (first publish / load in a process, or after
new items); medians of --repeats, printed (docs/benchmarks/recommender_scale_out.md). A replica
lags the trainer by up to publish interval + poll interval + load time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc import aio
from threadpoolctl import threadpool_info, threadpool_limits

from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_bench.paths import BENCH_DIR, DOCS, REPO
from snaplearn_common.server import start_grpc_server
from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_recommender.catalog import FORMATS, MAX_GRADE, MIN_GRADE, Catalog, LearningItem
from snaplearn_recommender.model import ClassifiedEvent, RecommenderModel
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.servicer import SERVICE_NAME, RecommenderServicer, add_to_server, to_response
from snaplearn_recommender.snapshot import FeatureFilter, RecommendResult, Snapshot, _reason, _top_k

OUT = DOCS / "recommender_serving.md"
PROTO = REPO / "protos" / "snaplearn" / "recommender" / "v1" / "recommender.proto"
K = 20
USERS = 2_000
CASES: dict[str, dict[str, Any]] = {
    "no filters": {},
    "grade 5 + video": {"grades": (5,), "formats": ("video",)},
    "exclude_seen": {"exclude_seen": True},
}


T = TypeVar("T")


def synthetic_events(count: int, users: int, seed: int = 0) -> list[ClassifiedEvent]:
    """`count` photos of `users` students, each mostly of their own favourite topic."""
    rng = np.random.default_rng(seed)
    favourite = rng.integers(len(DEFAULT_TOPICS), size=users)
    events = []
    for number in range(count):
        user = int(rng.integers(users))
        topic = DEFAULT_TOPICS[int(favourite[user])] if rng.random() < 0.8 else rng.choice(DEFAULT_TOPICS)
        other = DEFAULT_TOPICS[int(rng.integers(len(DEFAULT_TOPICS)))]
        labels = ((str(topic), 0.8), (other, 0.15))
        events.append(ClassifiedEvent(f"e{number}", f"user-{user}", labels, 1_700_000_000.0 + number))
    return events


def trained_model(items: int, events: int) -> RecommenderModel:
    """A model over big_catalog(items) that has applied `events` synthetic events (USERS users)."""
    model = RecommenderModel(big_catalog(items))
    applied = synthetic_events(events, USERS)
    for first in range(0, len(applied), 1000):
        model.apply(applied[first : first + 1000])
    return model


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
    def recommend(
        self,
        user_id: str,
        k: int = 0,
        exclude_seen: bool = False,
        grades: Collection[int] = (),
        formats: Collection[str] = (),
        concepts: Collection[str] = (),
        features: Sequence[FeatureFilter] = (),
    ) -> RecommendResult:
        if features:
            raise NotImplementedError("the baseline predates declared-feature filters")
        return baseline_recommend(self.snapshot, user_id, k, exclude_seen, grades, formats, concepts)


class OpportunisticBatcher:
    """EXPERIMENT, not the product: Recommend calls that reach the event loop in the same
    iteration are scored with one GEMM (flushed by call_soon: no added wait). Plain requests
    only (known user, no filters, no exclusions); measures whether batches form under grpc.aio."""

    def __init__(self, service: RecommendationService) -> None:
        self.service = service
        self.pending: list[tuple[Any, asyncio.Future[RecommendResult]]] = []
        self.sizes: dict[int, int] = {}

    def submit(self, request: Any) -> asyncio.Future[RecommendResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RecommendResult] = loop.create_future()
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.append((request, future))
        return future

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.sizes[len(batch)] = self.sizes.get(len(batch), 0) + 1
        snapshot = self.service.snapshot
        rows = [snapshot.user_index.get(request.user_id) for request, _ in batch]
        queries = np.ones((len(batch), snapshot.scoring_columns.shape[0]), dtype=np.float32)
        queries[:, :-1] = snapshot.user_vectors[[row or 0 for row in rows]]
        scores = queries @ snapshot.scoring_columns
        for j, ((request, future), row) in enumerate(zip(batch, rows, strict=True)):
            if row is None:
                future.set_result(self.service.recommend(request.user_id, request.k))
                continue
            top = _top_k(scores[j], request.k or 10)
            interests = snapshot.top_concepts(request.user_id)
            items = tuple(
                snapshot._item(
                    int(p), float(scores[j, p]), _reason(snapshot.catalog[int(p)].concepts, interests)
                )
                for p in top
            )
            future.set_result(
                RecommendResult(request.user_id, items, snapshot.version, False, snapshot.events_applied)
            )


def add_batched_servicer(batcher: OpportunisticBatcher, server: aio.Server) -> None:
    class BatchedServicer(RecommenderServicer):
        async def Recommend(self, request: Any, context: aio.ServicerContext) -> Any:
            return to_response(await batcher.submit(request))

    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(BatchedServicer(batcher.service), server)


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


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_ghz() -> str | None:
    found = shutil.which("ghz")
    fallback = Path.home() / "go" / "bin" / "ghz"  # where `go install` puts it
    return found or (str(fallback) if fallback.exists() else None)


async def run_load(target: str, client: str, args: argparse.Namespace) -> dict[str, Any]:
    """Drives `target` from another process; adds server/client CPU per request to the result."""
    if client == "ghz":
        await ghz_load(target, args, 2.0)  # warm-up, outside the CPU accounting
    cpu_before, children_before = time.process_time(), children_cpu_s()
    if client == "ghz":
        result = await ghz_load(target, args, args.seconds)
    else:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "snaplearn_bench.recommender_serving", "--client", target,
            "--concurrency", str(args.concurrency), "--seconds", str(args.seconds),
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(BENCH_DIR)},
        )  # fmt: skip
        out, _ = await process.communicate()
        result = json.loads(out)
    total = max(1, result["total_completed"])
    result["server_cpu_ms_per_request"] = round((time.process_time() - cpu_before) * 1e3 / total, 3)
    result["client_cpu_ms_per_request"] = round((children_cpu_s() - children_before) * 1e3 / total, 3)
    return result


async def ghz_load(target: str, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """ghz with --concurrency callers for `seconds`; in-flight calls at the end are waited for."""
    ghz = find_ghz()
    assert ghz is not None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "requests.json"  # ghz sends them round robin: the same users as --client
        data.write_text(json.dumps([{"user_id": f"user-{i}", "k": K} for i in range(USERS)]))
        window_start = time.time()
        process = await asyncio.create_subprocess_exec(
            ghz, "--insecure", "--proto", str(PROTO), "--import-paths", str(PROTO.parents[3]),
            "--call", f"{SERVICE_NAME}.Recommend", "-D", str(data), "-c", str(args.concurrency),
            "--duration-stop", "wait", "-O", "json", "-z", f"{seconds:g}s", target,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        window_end = time.time()
    report = json.loads(out)
    codes = report.get("statusCodeDistribution", {})
    completed = int(codes.get("OK", 0))
    latencies = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    return {
        "window_start": window_start,
        "window_end": window_end,
        "completed": completed,
        "total_completed": int(report["count"]),
        "errors": int(report["count"]) - completed,
        "requests_per_s": round(completed / (report["total"] / 1e9), 1),
        "client_ms": {f"p{q}": round(latencies.get(q, float("nan")), 3) for q in (50, 95, 99)},
    }


async def serve_and_load(
    service: RecommendationService,
    client: str,
    args: argparse.Namespace,
    batcher: OpportunisticBatcher | None = None,
) -> dict[str, Any]:
    timer = HandlerTimer()
    add = (
        functools.partial(add_batched_servicer, batcher)
        if batcher
        else functools.partial(add_to_server, service)
    )
    server = await start_grpc_server([add], [SERVICE_NAME], interceptors=[timer])
    try:
        result = await run_load(f"127.0.0.1:{server.port}", client, args)
    finally:
        await server.stop(1.0)
    window = [d for end, d in timer.records if result["window_start"] <= end <= result["window_end"]]
    result["server_handler_ms"] = percentiles_ms(window) if window else {}
    return result


async def serve_for(service: RecommendationService, seconds: float) -> None:
    server = await start_grpc_server([functools.partial(add_to_server, service)], [SERVICE_NAME])
    print(f"serving on 127.0.0.1:{server.port} for {seconds:g} s", file=sys.stderr, flush=True)
    await asyncio.sleep(seconds)
    await server.stop(1.0)


def sync_serve_and_load(service: RecommendationService, args: argparse.Namespace) -> dict[str, Any]:
    """The same core behind grpc.server (sync, thread pool): handler timed inside the method."""
    records: list[tuple[float, float]] = []

    class SyncServicer(recommender_pb2_grpc.RecommenderServiceServicer):
        def Recommend(self, request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                return to_response(service.recommend(request.user_id, request.k, request.exclude_seen))
            finally:
                records.append((time.time(), time.perf_counter() - started))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.sync_workers))
    recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(SyncServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = asyncio.run(run_load(f"127.0.0.1:{port}", "ghz", args))
    finally:
        server.stop(1.0)
    window = [d for end, d in records if result["window_start"] <= end <= result["window_end"]]
    result["server_handler_ms"] = percentiles_ms(window) if window else {}
    return result


def batched_scoring(snapshot: Snapshot, batch_sizes: tuple[int, ...] = (1, 4, 16, 64)) -> dict[int, float]:
    """Microseconds per request to score B users in one GEMM (what micro-batching would do).

    The fastest of many repetitions: a cost model, so preemption by other processes is left out."""
    columns = snapshot.scoring_columns
    queries = np.hstack([snapshot.user_vectors[:64], np.ones((64, 1), dtype=np.float32)]).astype(np.float32)
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for b in batch_sizes:
            block = np.ascontiguousarray(queries[:b])
            times = []
            for _ in range(max(20, 1000 // b)):
                started = time.perf_counter()
                block @ columns
                times.append(time.perf_counter() - started)
            out[b] = round(min(times) * 1e6 / b, 1)
    return out


async def client_main(target: str, concurrency: int, seconds: float, warmup_s: float = 2.0) -> None:
    async with aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
        await channel.channel_ready()
        start = time.time() + warmup_s
        end = start + seconds
        latencies: list[float] = []
        errors = total = 0

        async def caller(number: int) -> None:
            nonlocal errors, total
            i = number
            while (now := time.time()) < end:
                request = recommender_pb2.RecommendRequest(user_id=f"user-{i % USERS}", k=K)
                i += concurrency
                try:
                    await stub.Recommend(request, timeout=10)
                except grpc.RpcError:
                    errors += 1
                    continue
                total += 1
                if now >= start and time.time() <= end:
                    latencies.append(time.time() - now)

        await asyncio.gather(*(caller(n) for n in range(concurrency)))
    print(
        json.dumps(
            {
                "window_start": start,
                "window_end": end,
                "completed": len(latencies),
                "total_completed": total,
                "errors": errors,
                "requests_per_s": round(len(latencies) / seconds, 1),
                "client_ms": percentiles_ms(latencies),
            }
        )
    )


def snapshot_store_costs(model: RecommenderModel, repeats: int) -> None:
    """Print the medians of snapshot build, publish and load, catalog cached and new."""
    from snaplearn_recommender.snapshot_store import LocalDirectoryStorage, SnapshotStore

    times: dict[str, list[float]] = {
        name: [] for name in ("build", "publish", "load", "cold publish", "cold load")
    }

    def timed(name: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = work()
        times[name].append(time.perf_counter() - started)
        return result

    with tempfile.TemporaryDirectory() as directory:
        trainer = SnapshotStore(LocalDirectoryStorage(directory), retain=2)
        replica = SnapshotStore(LocalDirectoryStorage(directory))
        timed("publish", lambda: trainer.publish(model.snapshot()))  # the catalog cache warms up
        timed("load", lambda: replica.load(trainer.versions()[-1]))
        times["publish"].clear()
        times["load"].clear()
        for _ in range(repeats):
            snapshot = timed("build", model.snapshot)
            # Steady state: the same trainer and replica objects, the catalog unchanged.
            manifest = timed("publish", lambda: trainer.publish(snapshot))  # noqa: B023
            _, loaded = timed("load", lambda: replica.load(manifest.version))  # noqa: B023
            assert loaded.version == snapshot.version
            # A catalog seen for the first time (a fresh process, or new items).
            fresh = SnapshotStore(LocalDirectoryStorage(directory), retain=2)
            cold = timed("cold publish", lambda: fresh.publish(snapshot))  # noqa: B023
            timed("cold load", lambda: SnapshotStore(LocalDirectoryStorage(directory)).load(cold.version))  # noqa: B023
    ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(
        f"{model.n_items} items, {model.n_users} users, {manifest.size / 1e6:.1f} MB per version "
        f"(catalog {manifest.catalog_size / 1e6:.1f} MB); medians of {repeats}, ms:"
    )
    for name in ("publish", "load"):
        print(
            f"  {name:8s} {ms[name]:6.0f} (catalog cached) | {ms['cold ' + name]:6.0f} (catalog new) "
            f"| ratio {ms['cold ' + name] / ms[name]:.1f}x | snapshot build {ms['build']:.0f}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/recommender_serving.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="events the model applies first (10000; 20000 with --snapshot-store)",
    )
    parser.add_argument("--requests", type=int, default=2_000, help="per core-latency case")
    parser.add_argument("--seconds", type=float, default=10.0, help="gRPC load window per variant")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--clients", default="python,ghz", help="load generators (ghz: if installed)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="load runs per variant, the median shown (3); with --snapshot-store, of each step (7)",
    )
    parser.add_argument("--sync-workers", type=int, default=8, help="threads of the sync server variant")
    parser.add_argument(
        "--serve-seconds",
        type=float,
        default=0.0,
        help="only serve the model (as deployed: no timing interceptor) for this long, for profiling",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="the page written (default: %(default)s)")
    parser.add_argument(
        "--snapshot-store",
        action="store_true",
        help="only measure snapshot build, publish and load (what scale-out costs per version)",
    )
    parser.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.client:
        asyncio.run(client_main(args.client, args.concurrency, args.seconds))
        return 0
    if args.snapshot_store:
        snapshot_store_costs(trained_model(args.items, args.events or 20_000), args.repeats or 7)
        return 0
    args.events = args.events or 10_000
    args.repeats = args.repeats or 3

    default_blas = max(
        (pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=1
    )
    started = time.perf_counter()
    model = trained_model(args.items, args.events)
    setup_s = time.perf_counter() - started
    build_s = []
    for _ in range(5):
        started = time.perf_counter()
        snapshot = model.snapshot()
        build_s.append(time.perf_counter() - started)
    print(f"model with {model.n_items} items, {model.n_users} users in {setup_s:.1f} s", file=sys.stderr)
    if args.serve_seconds:
        asyncio.run(serve_for(RecommendationService(snapshot), args.serve_seconds))
        return 0

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

    batched = batched_scoring(snapshot)
    print("GEMM us per request by batch size", batched, file=sys.stderr)

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if "ghz" in clients and find_ghz() is None:
        print("ghz not found (go install github.com/bojand/ghz/cmd/ghz@latest): skipped", file=sys.stderr)
        clients.remove("ghz")
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):  # variants interleaved, so slow phases of the machine hit all
        for client in clients:
            for label, service_type in (("before", BaselineService), ("after", RecommendationService)):
                if client == "ghz" and service_type is BaselineService:
                    continue  # before/after is shown with the Python client
                service = service_type(snapshot)  # sets BLAS to 1 thread ...
                if service_type is BaselineService:
                    threadpool_limits(limits=default_blas, user_api="blas")  # ... which "before" did not
                name = f"{label}, grpc.aio server, {client} client"
                runs.setdefault(name, []).append(asyncio.run(serve_and_load(service, client, args)))
                print(repeat, name, runs[name][-1], file=sys.stderr)
            if client == "python":
                name = "after + opportunistic micro-batching (experiment), grpc.aio server, python client"
                batcher = OpportunisticBatcher(RecommendationService(snapshot))
                result = asyncio.run(serve_and_load(batcher.service, client, args, batcher))
                calls = sum(size * count for size, count in batcher.sizes.items())
                result["batch_share_of_calls"] = {
                    group: round(sum(z * c for z, c in batcher.sizes.items() if low <= z <= high) / calls, 3)
                    for group, (low, high) in {
                        "1": (1, 1),
                        "2": (2, 2),
                        "3-7": (3, 7),
                        "8+": (8, 10**9),
                    }.items()
                }
                runs.setdefault(name, []).append(result)
                print(repeat, name, result, file=sys.stderr)
            if client == "ghz":
                name = f"after, sync grpc.server ({args.sync_workers} threads), ghz client"
                runs.setdefault(name, []).append(sync_serve_and_load(RecommendationService(snapshot), args))
                print(repeat, name, runs[name][-1], file=sys.stderr)
    load = {}
    for name, results in runs.items():  # the run with the median requests/s stands for the variant
        ordered = sorted(results, key=lambda r: r["requests_per_s"])
        load[name] = ordered[(len(ordered) - 1) // 2] | {
            "all_requests_per_s": [r["requests_per_s"] for r in results]
        }
    write_report(args, default_blas, build_s, core, percentiles_ms(similar), batched, load)
    return 0


def write_report(
    args: argparse.Namespace,
    default_blas: int,
    build_s: list[float],
    core: dict[str, dict[str, dict[str, float]]],
    similar: dict[str, float],
    batched: dict[int, float],
    load: dict[str, dict[str, Any]],
) -> None:
    def row(name: str, p: dict[str, float]) -> str:
        return f"| {name} | {p.get('p50', float('nan'))} | {p.get('p95', float('nan'))} | {p.get('p99')} |"

    lines = [
        "# Recommender serving at catalog scale",
        "",
        f"Command: `python benchmarks/recommender_serving.py --items {args.items} --events {args.events} "
        f"--seconds {args.seconds:g} --concurrency {args.concurrency} --repeats {args.repeats}`  ",
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
        "## (b, c, d) Through a real gRPC server (Recommend, no filters, k = 20)",
        "",
        f"Load generator in another process, {args.concurrency} concurrent calls, {args.seconds:g} s "
        "window after 2 s of warm-up. python = grpc.aio client (this script with --client); ghz = "
        "the Go load generator (waits for in-flight calls at the end). Server-side = handler time "
        "(grpc.aio: a server interceptor, after deserialisation and before serialisation; sync: "
        "inside the method). CPU ms/request = process CPU time (all threads) / calls completed: "
        "1 / (server CPU ms/request) is the server's ceiling in req/s per core it gets (server CPU "
        "includes the timing interceptor; client CPU includes the client's start-up).",
        "",
        f"Each variant ran {args.repeats} times, interleaved with the others; the row is the run "
        "with the median requests/s, the last column lists all runs.",
        "",
        "| server, load generator | requests/s | errors | server p50 | server p95 | server p99 "
        "| client p50 | client p99 | server CPU ms/req | client CPU ms/req | requests/s, all runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, result in load.items():
        server, client = result["server_handler_ms"], result["client_ms"]
        lines.append(
            f"| {label} | {result['requests_per_s']} | {result['errors']} | {server.get('p50')} "
            f"| {server.get('p95')} | {server.get('p99')} | {client['p50']} | {client['p99']} "
            f"| {result['server_cpu_ms_per_request']} | {result['client_cpu_ms_per_request']} "
            f"| {', '.join(str(r) for r in result['all_requests_per_s'])} |"
        )
    for label, result in load.items():
        if "batch_share_of_calls" in result:
            shares = ", ".join(
                f"{size}: {share:.0%}" for size, share in result["batch_share_of_calls"].items()
            )
            lines += ["", f"Share of calls by the size of the batch they were scored in ({label}): {shares}."]
    lines += [
        "",
        "## (e) Micro-batching, cost model: one GEMM for B concurrent requests",
        "",
        "Microseconds per request to score B users against all items in one (B, d+1) x (d+1, n) "
        "float32 GEMM, one BLAS thread, fastest of many repetitions (B = 1 is today's matvec):",
        "",
        "| B | " + " | ".join(str(b) for b in batched) + " |",
        "|---|" + "---|" * len(batched),
        "| us / request | " + " | ".join(str(v) for v in batched.values()) + " |",
    ]
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = out.read_text() if out.exists() else ""
    notes = existing[existing.index("## Notes") :] if "## Notes" in existing else ""
    out.write_text("\n".join(lines) + "\n\n" + notes)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
