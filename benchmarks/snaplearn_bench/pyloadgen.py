"""The Python load generator for image classification servers: closed loop or open loop, gRPC or HTTP.

    python -m snaplearn_bench.pyloadgen --target 127.0.0.1:50051 closed --concurrency 64 --seconds 15
    python -m snaplearn_bench.pyloadgen --target 127.0.0.1:50051 open --rate 100 --seconds 15
    python -m snaplearn_bench.pyloadgen --target http://127.0.0.1:8000/predict --protocol http closed ...

The Go generator (benchmarks/loadgen) has the same command line and JSON at a fraction of the
CPU; this one is for machines without Go (`--load-generator python`).

Closed loop: N callers, each sending its next request when the previous one answers (measures
capacity). Open loop: requests start at a fixed rate whatever happens to earlier ones (measures
latency at a given load, and behaviour under overload). Payloads are real JPEG photos rendered
by snaplearn_vision.worksheets. The requests started inside the measurement window count, and
the generator waits for all their answers (a warm-up precedes the window). Prints one JSON
object (see LoadResult).

Protocols: "grpc" sends snaplearn.vision.v1 Classify (our server, and Ray Serve's gRPC proxy
serving the same proto); "http" POSTs {"image": base64} JSON (LitServe); "oip" sends the Open
Inference Protocol's ModelInfer for --model, the photo as BYTES input IMAGE (our server's OIP
endpoint, and NVIDIA Triton).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from grpc import StatusCode, aio

from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_bench.load import photos
from snaplearn_bench.report import percentile

# call(client, image, timeout_s) returns (status name, server batch size or 0) and raises
# nothing. A closed loop's caller keeps one client (one connection, one user); an open loop's
# requests take the clients in turn.
Call = Callable[[int, bytes, float], Awaitable[tuple[str, int]]]


# What grpc answers over a server's maximum_concurrent_rpcs, counted apart from our refusals.
GRPC_CAP_DETAILS = "Concurrent RPC limit exceeded!"
GRPC_CAP_STATUS = "RESOURCE_EXHAUSTED_GRPC_CAP"


@dataclass
class LoadResult:
    mode: str  # "closed" or "open"
    concurrency: int  # closed loop
    rate: float  # open loop: requests started per second
    seconds: float
    sent: int = 0
    ok: int = 0
    throughput: float = 0.0  # OK answers per second (goodput)
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: dict[str, int] = field(default_factory=dict)  # by status name
    # Latency of the refusals (RESOURCE_EXHAUSTED / HTTP 429 / 503), which should be immediate.
    rejected_p99_ms: float = float("nan")
    mean_batch_size_seen: float = float("nan")  # from responses that report it (ours)
    # The generator's own health: how late (p99) the open loop started requests against its
    # schedule, and the CPU it used (in cores, over its whole run). A late generator measures
    # its own queueing, not the server's; on a 2-core machine its CPU is the server's loss.
    send_lag_p99_ms: float = float("nan")
    generator_cpu_cores: float = float("nan")


class Recorder:
    def __init__(self, window_start: float, window_end: float) -> None:
        self.window = (window_start, window_end)
        self.ok_latencies: list[float] = []
        self.rejected_latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.sent = 0

    def record(self, started: float, finished: float, status: str, batch_size: int) -> None:
        # By start time: under overload answers arrive late, and each must count for the
        # window that sent it (the generator waits for every answer before it reports).
        if not self.window[0] <= started < self.window[1]:
            return
        self.sent += 1
        self.statuses[status] += 1
        if status == "OK":
            self.ok_latencies.append(finished - started)
            if batch_size:
                self.batch_sizes.append(batch_size)
        elif status in ("RESOURCE_EXHAUSTED", GRPC_CAP_STATUS, "HTTP_429", "HTTP_503"):
            self.rejected_latencies.append(finished - started)

    def result(self, mode: str, concurrency: int, rate: float) -> LoadResult:
        seconds = self.window[1] - self.window[0]
        latencies = sorted(self.ok_latencies)
        rejected = sorted(self.rejected_latencies)
        return LoadResult(
            mode=mode,
            concurrency=concurrency,
            rate=rate,
            seconds=seconds,
            sent=self.sent,
            ok=len(latencies),
            throughput=len(latencies) / seconds,
            p50_ms=percentile(latencies, 0.50) * 1000,
            p95_ms=percentile(latencies, 0.95) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            errors={status: n for status, n in sorted(self.statuses.items()) if status != "OK"},
            rejected_p99_ms=percentile(rejected, 0.99) * 1000,
            mean_batch_size_seen=(sum(self.batch_sizes) / len(self.batch_sizes))
            if self.batch_sizes
            else float("nan"),
        )


@contextlib.asynccontextmanager
async def grpc_channels(target: str, connections: int) -> AsyncIterator[list[aio.Channel]]:
    """Several channels: one HTTP/2 connection per channel, as many independent clients would
    use (a server with worker processes behind one port spreads connections, not calls)."""
    channels = [
        aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections)
    ]
    try:
        yield channels
    finally:
        for channel in channels:
            await channel.close()


@contextlib.asynccontextmanager
async def grpc_caller(target: str, connections: int = 4) -> Any:
    async with grpc_channels(target, connections) as channels:
        stubs = [vision_pb2_grpc.VisionServiceStub(channel) for channel in channels]

        async def call(client: int, image: bytes, timeout_s: float) -> tuple[str, int]:
            stub = stubs[client % len(stubs)]
            try:
                reply = await stub.Classify(
                    vision_pb2.ClassifyRequest(user_id=f"bench-{client % 1000}", image=image),
                    timeout=timeout_s,
                )
            except aio.AioRpcError as error:
                code = error.code()
                if code == StatusCode.RESOURCE_EXHAUSTED and error.details() == GRPC_CAP_DETAILS:
                    return GRPC_CAP_STATUS, 0  # grpc's own cap refused it, before the server's code
                return (code.name if isinstance(code, StatusCode) else str(code)), 0
            return "OK", reply.batch_size

        yield call


@contextlib.asynccontextmanager
async def oip_caller(target: str, model: str, connections: int = 4) -> Any:
    from snaplearn_oip import grpc_service_pb2 as oip
    from snaplearn_oip import grpc_service_pb2_grpc as oip_grpc

    tensor = oip.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1, 1])
    async with grpc_channels(target, connections) as channels:
        stubs = [oip_grpc.GRPCInferenceServiceStub(channel) for channel in channels]

        async def call(client: int, image: bytes, timeout_s: float) -> tuple[str, int]:
            # BYTES in raw_input_contents: each element is a 4-byte little-endian length + bytes.
            request = oip.ModelInferRequest(
                model_name=model,
                inputs=[tensor],
                raw_input_contents=[len(image).to_bytes(4, "little") + image],
            )
            try:
                reply = await stubs[client % len(stubs)].ModelInfer(request, timeout=timeout_s)
            except aio.AioRpcError as error:
                code = error.code()
                return (code.name if isinstance(code, StatusCode) else str(code)), 0
            return ("OK" if reply.outputs else "NO_OUTPUT"), 0  # the protocol does not say the batch

        yield call


@contextlib.asynccontextmanager
async def http_caller(url: str, connections: int) -> Any:
    import aiohttp  # the bench extra

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))

    async def call(_client: int, image: bytes, timeout_s: float) -> tuple[str, int]:
        body = {"image": base64.b64encode(image).decode()}
        try:
            async with session.post(
                url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                payload = await response.read()
                if response.status != 200:
                    return f"HTTP_{response.status}", 0
                return "OK", int(json.loads(payload).get("batch_size", 0))
        except TimeoutError:
            return "DEADLINE_EXCEEDED", 0
        except aiohttp.ClientError as error:
            return type(error).__name__, 0

    try:
        yield call
    finally:
        await session.close()


async def closed_loop(
    call: Call, images: list[bytes], concurrency: int, warmup_s: float, seconds: float, timeout_s: float
) -> LoadResult:
    start = time.monotonic()
    recorder = Recorder(start + warmup_s, start + warmup_s + seconds)
    stop = recorder.window[1]

    async def caller(index: int) -> None:
        n = index
        while time.monotonic() < stop:
            image = images[n % len(images)]
            n += concurrency
            began = time.monotonic()
            status, batch_size = await call(index, image, timeout_s)
            recorder.record(began, time.monotonic(), status, batch_size)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return recorder.result("closed", concurrency, 0.0)


async def open_loop(
    call: Call, images: list[bytes], rate: float, warmup_s: float, seconds: float, timeout_s: float
) -> LoadResult:
    start = time.monotonic()
    recorder = Recorder(start + warmup_s, start + warmup_s + seconds)
    interval = 1.0 / rate
    tasks: set[asyncio.Task[None]] = set()

    async def one(client: int, image: bytes) -> None:
        began = time.monotonic()
        status, batch_size = await call(client, image, timeout_s)
        recorder.record(began, time.monotonic(), status, batch_size)

    n = 0
    lags: list[float] = []
    while True:
        due = start + n * interval  # fixed schedule: a slow answer never delays the next request
        if due >= recorder.window[1]:
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if due >= recorder.window[0]:
            lags.append(time.monotonic() - due)
        task = asyncio.get_running_loop().create_task(one(n, images[n % len(images)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 5)
    result = recorder.result("open", 0, rate)
    result.send_lag_p99_ms = percentile(sorted(lags), 0.99) * 1000
    return result


async def run(args: argparse.Namespace) -> LoadResult:
    images = photos()
    if args.protocol == "grpc":
        caller = grpc_caller(args.target, args.connections)
    elif args.protocol == "oip":
        caller = oip_caller(args.target, args.model, args.connections)
    else:
        caller = http_caller(args.target, args.concurrency if args.mode == "closed" else 512)
    async with caller as call:
        if args.mode == "closed":
            return await closed_loop(call, images, args.concurrency, args.warmup, args.seconds, args.timeout)
        return await open_loop(call, images, args.rate, args.warmup, args.seconds, args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help="host:port (grpc) or URL (http)")
    parser.add_argument("--protocol", choices=("grpc", "http", "oip"), default="grpc")
    parser.add_argument("--model", default="", help="the model ModelInfer names (oip; required there)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, seconds")
    parser.add_argument(
        "--connections", type=int, default=4, help="gRPC connections the calls are spread over"
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    closed = modes.add_parser("closed", help="N concurrent callers, back to back")
    closed.add_argument("--concurrency", type=int, default=64)
    opened = modes.add_parser("open", help="a fixed request rate")
    opened.add_argument("--rate", type=float, required=True, help="requests per second")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.protocol == "oip" and not args.model:
        parser.error("--protocol oip needs --model (ModelInfer names its model)")
    if args.mode == "open":
        args.concurrency = 0
    wall, cpu = time.monotonic(), time.process_time()
    result = asyncio.run(run(args))
    result.generator_cpu_cores = (time.process_time() - cpu) / (time.monotonic() - wall)
    json.dump(asdict(result), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
