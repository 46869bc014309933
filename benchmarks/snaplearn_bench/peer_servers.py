"""The peers, serving the same model with their own dynamic batching, for the vision comparison.

    python -m snaplearn_bench.peer_servers ray --repository R --model M --port 9000
    python -m snaplearn_bench.peer_servers litserve --repository R --model M --port 8000
    <triton venv>/bin/python -m snaplearn_bench.peer_servers triton --repository R --model M --port 8001

Each loads the model through our engine (ImageClassifier: the same decode_pixels and
predict_pixels as our server and the raw bound), so only the serving layer differs, and is
configured the way its documentation recommends for CPU serving:

- Ray Serve: one replica, `@serve.batch(max_batch_size, batch_wait_timeout_s)` around decode +
  forward, `max_ongoing_requests` = 2 x max batch size (the batching guide: it must be at
  least the batch size, or batches never fill), the gRPC proxy serving snaplearn.vision.v1
  Classify (the same proto our server speaks).
- LitServe: one worker on the CPU, `LitAPI(max_batch_size, batch_timeout)`; decode_request
  per request, predict per batch; HTTP JSON with the photo base64-encoded.
- NVIDIA Triton, through PyTriton (the pip-installable Triton: the tritonserver binary with
  its Python backend, handing each batch to this process): one model instance, Triton's
  dynamic batcher (`max_batch_size`, `max_queue_delay_microseconds`, its defaults otherwise),
  the Open Inference Protocol over gRPC with the photo as BYTES input IMAGE and the
  probabilities as output PROBABILITIES (what our server's OIP endpoint speaks). Runs in its own
  virtualenv (PyTriton pins numpy<2; snaplearn_bench.peers.ensure_triton builds it).

Each prints "ready" once it answers, and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import signal
import sys
import threading
from pathlib import Path
from typing import Any

GRPC_SERVICER = "snaplearn.vision.v1.vision_pb2_grpc.add_VisionServiceServicer_to_server"


def load_model(repository: Path, model: str, torch_threads: int) -> Any:
    from snaplearn_bench.models import load_classifier
    from snaplearn_bench.raw import apply_torch_settings

    apply_torch_settings(torch_threads)
    return load_classifier(repository, model)


def wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def run_ray(args: argparse.Namespace) -> None:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from snaplearn.vision.v1 import vision_pb2

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(
        http_options=HTTPOptions(port=args.http_port or args.port + 1),
        grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=[GRPC_SERVICER]),
    )

    @serve.deployment(max_ongoing_requests=2 * args.max_batch_size, num_replicas=1)
    class Classifier:
        def __init__(
            self, repository: str, model: str, torch_threads: int, max_batch: int, wait_s: float
        ) -> None:
            self.model = load_model(Path(repository), model, torch_threads)
            # serve.batch's setters, untyped in Ray's stubs where Ray is installed.
            batched: Any = self.classify_batch
            batched.set_max_batch_size(max_batch)
            batched.set_batch_wait_timeout_s(wait_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def classify_batch(self, images: list[bytes]) -> list[tuple[Any, int]]:
            pixels = [self.model.decode_pixels(image) for image in images]
            return [(row, len(images)) for row in self.model.predict_pixels(pixels)]

        async def Classify(self, request: Any) -> Any:
            probabilities, batch_size = await self.classify_batch(request.image)
            labels = self.model.top_k(probabilities, 5)
            return vision_pb2.ClassifyResponse(
                labels=[vision_pb2.LabelScore(label=label, score=score) for label, score in labels],
                model_name=self.model.name,
                model_version=self.model.version,
                batch_size=batch_size,
            )

    app = Classifier.bind(  # type: ignore[attr-defined]  # serve.deployment's wrapper
        str(args.repository), args.model, args.torch_threads, args.max_batch_size, args.wait_s
    )
    serve.run(app, name="vision", route_prefix="/")
    print("ready", flush=True)
    wait_for_signal()
    serve.shutdown()
    ray.shutdown()


try:  # LitServe pickles the API into its worker process: the class must be importable by name.
    import litserve as _litserve
except ImportError:  # the bench extra is not installed; the vision comparison installs it
    _litserve = None

if _litserve is not None:

    class LitClassifierAPI(_litserve.LitAPI):
        model_source: tuple[Path, str, int]

        def setup(self, device: str) -> None:
            self.model = load_model(*self.model_source)

        def decode_request(self, request):  # LitServe reads its hints: none here
            return self.model.decode_pixels(base64.b64decode(request["image"]))

        def batch(self, inputs: list[Any]) -> list[Any]:
            return inputs

        def predict(self, batch: list[Any]) -> list[tuple[Any, int]]:
            return [(row, len(batch)) for row in self.model.predict_pixels(batch)]

        def unbatch(self, output: list[Any]) -> list[Any]:
            return output

        def encode_response(self, output: tuple[Any, int]) -> dict[str, Any]:
            probabilities, batch_size = output
            labels = self.model.top_k(probabilities, 5)
            return {"labels": [[label, score] for label, score in labels], "batch_size": batch_size}


def run_litserve(args: argparse.Namespace) -> None:
    import litserve as ls

    api = LitClassifierAPI(max_batch_size=args.max_batch_size, batch_timeout=args.wait_s)
    api.model_source = (args.repository, args.model, args.torch_threads)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    threading.Thread(target=_announce_when_healthy, args=(args.port,), daemon=True).start()
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False, log_level="warning")


def run_triton(args: argparse.Namespace) -> None:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    model = load_model(args.repository, args.model, args.torch_threads)

    @batch
    def classify(IMAGE: Any) -> dict[str, Any]:  # PyTriton passes inputs by name
        # IMAGE: an object array [batch, 1] of encoded photos.
        pixels = [model.decode_pixels(bytes(row[0])) for row in IMAGE]
        return {"PROBABILITIES": np.asarray(model.predict_pixels(pixels), dtype=np.float32)}

    config = TritonConfig(
        grpc_port=args.port,
        http_port=args.http_port or args.port + 1,
        metrics_port=args.metrics_port or args.port + 2,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=classify,
            inputs=[Tensor(name="IMAGE", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="PROBABILITIES", dtype=np.float32, shape=(len(model.labels),))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.wait_s * 1_000_000)),
            ),
            strict=True,
        )
        triton.run()  # returns once the model is loaded and the server answers
        print("ready", flush=True)
        wait_for_signal()


def _announce_when_healthy(port: int) -> None:
    import time
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    print("ready", flush=True)
                    return
        except OSError:
            pass
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("peer", choices=("ray", "litserve", "triton"))
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--wait-s", type=float, default=0.005, help="max wait for a fuller batch")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="Ray: CPUs of the local cluster")
    parser.add_argument(
        "--http-port", type=int, default=0, help="Ray, Triton: their HTTP port (0: --port + 1)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="Triton: its metrics port (0: --port + 2)"
    )
    args = parser.parse_args(argv)
    if args.peer == "ray":
        run_ray(args)
    elif args.peer == "triton":
        run_triton(args)
    else:
        run_litserve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
