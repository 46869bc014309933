"""Closed-loop load: C concurrent clients, each sending Classify back to back for D seconds."""
import argparse, asyncio, statistics, time, urllib.request
from grpc import aio
from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc
from snaplearn_vision.worksheets import sample_image_bytes
from snaplearn_common.topics import DEFAULT_TOPICS

async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--metrics", default="")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--warmup", type=float, default=3)
    a = p.parse_args()
    images = [sample_image_bytes(t, seed=s) for t in DEFAULT_TOPICS for s in range(4)]
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    async with aio.insecure_channel(a.target) as ch:
        stub = vision_pb2_grpc.VisionServiceStub(ch)
        start = time.monotonic(); measure_from = start + a.warmup; stop = measure_from + a.seconds
        async def worker(i: int) -> None:
            nonlocal errors
            n = i
            while time.monotonic() < stop:
                img = images[n % len(images)]; n += 7
                t0 = time.monotonic()
                try:
                    r = await stub.Classify(vision_pb2.ClassifyRequest(user_id=f"bench-{i}", image=img), timeout=30)
                except aio.AioRpcError:
                    errors += 1; continue
                t1 = time.monotonic()
                if t0 >= measure_from and t1 <= stop:
                    latencies.append(t1 - t0); batch_sizes.append(r.batch_size)
        await asyncio.gather(*(worker(i) for i in range(a.concurrency)))
    lat = sorted(latencies)
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000
    print(f"concurrency={a.concurrency} duration={a.seconds}s requests={len(lat)} errors={errors}")
    print(f"throughput={len(lat)/a.seconds:.1f} req/s  p50={q(0.5):.1f} ms  p90={q(0.9):.1f} ms  p99={q(0.99):.1f} ms")
    print(f"mean batch size seen by requests={statistics.mean(batch_sizes):.1f}")
    if a.metrics:
        text = urllib.request.urlopen(f"http://{a.metrics}/metrics").read().decode()
        for line in text.splitlines():
            if line.startswith(("snaplearn_vision_batch_size_sum", "snaplearn_vision_batch_size_count", "snaplearn_vision_batch_compute_seconds_sum", "snaplearn_vision_batch_compute_seconds_count")):
                print(line)

asyncio.run(main())
