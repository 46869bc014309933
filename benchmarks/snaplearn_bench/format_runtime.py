"""The torch side of the model-format benchmark: export a network to every format, write the
version folders a server loads, and measure the bare runtime of each file.

    python -m snaplearn_bench.format_runtime export --model resnet50 --out DIR --formats onnx,torchscript
    python -m snaplearn_bench.format_runtime bare --file DIR/resnet50.onnx --format onnx --size 224

"Bare" means the format's own runtime with nothing of ours around it: torch.jit.load,
torch.export.load(...).module(), an onnxruntime InferenceSession, or the torchvision module for
a state_dict, fed one preprocessed random batch again and again. It is the bound a server of
that file can approach: no decode, no batching, no network. Each subcommand prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

FORMATS = ("torchscript", "torch_export", "onnx", "state_dict")
SUFFIXES = {"torchscript": ".ts.pt", "torch_export": ".pt2", "onnx": ".onnx", "state_dict": ".state_dict.pt"}
# torch.export's symbolic batch dimension: an upper bound is required; well above any batcher's.
MAX_EXPORT_BATCH = 1024


def export_network(network: Any, example: Any, out: Path, stem: str, formats: list[str]) -> dict[str, Any]:
    """Write `network` (an eval-mode nn.Module) in each of `formats` as out/<stem><suffix>, each
    with a dynamic batch dimension: {"files": {format: path}, "export_s": {format: seconds},
    "failed": {format: why}}."""

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    for fmt in formats:
        path = out / f"{stem}{SUFFIXES[fmt]}"
        started = time.perf_counter()
        try:
            _export_one(network, example, path, fmt)
        except Exception as error:  # one format that cannot be exported leaves the others
            failed[fmt] = f"export: {type(error).__name__}: {str(error)[-400:]}"
            continue
        files[fmt] = str(path)
        seconds[fmt] = time.perf_counter() - started
    return {"files": files, "export_s": seconds, "failed": failed}


def _export_one(network: Any, example: Any, path: Path, fmt: str) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter, not our concern here
        if fmt == "state_dict":
            torch.save(network.state_dict(), path)
        elif fmt == "torchscript":
            with torch.no_grad():
                torch.jit.trace(network, example).save(str(path))
        elif fmt == "torch_export":
            batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
            program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
        else:
            torch.onnx.export(
                network,
                (example,),
                str(path),
                input_names=["pixels"],
                output_names=["logits"],
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )


def spec(model: str, default_root: Path | None = None, size: int = 224) -> dict[str, Any]:
    """What a model name means here: architecture, input and preprocessing, and the state_dict
    to start from (the default model's trained weights, its own input size; torchvision ones are
    random, at `size` x `size`)."""
    if default_root is not None and (default_root / model).is_dir():
        from snaplearn_vision.runtime.model_repository import ModelRepository

        repository = ModelRepository(default_root)
        version = repository.latest_version(model)
        config = repository.load_config(model, str(version))
        weights = default_root / model / str(version) / (config.weights or "model.pt")
        return {
            "architecture": config.architecture,
            "size": list(config.input_size),
            "channels": config.channels,
            "mean": list(config.mean),
            "std": list(config.std),
            "labels": list(config.labels),
            "weights": str(weights),
        }
    from snaplearn_common.topics import DEFAULT_TOPICS

    return {
        "architecture": model,
        "size": [size, size],
        "channels": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "labels": list(DEFAULT_TOPICS),
        "weights": "",
    }


def build(model_spec: dict[str, Any]) -> Any:
    """The eval-mode network of a spec(), seeded (random weights unless the spec has some)."""
    import torch

    from snaplearn_vision.runtime.architectures import build_model

    torch.manual_seed(0)
    network = build_model(model_spec["architecture"], len(model_spec["labels"]), model_spec["channels"])
    if model_spec["weights"]:
        network.load_state_dict(torch.load(model_spec["weights"], map_location="cpu", weights_only=True))
    return network.eval()


def write_version(
    root: Path, name: str, file: str, fmt: str, model_spec: dict[str, Any], max_batch_size: int
) -> Path:
    """<root>/<name>/1 holding `file` (hard-linked or copied) and its config.json: what
    `snaplearn-vision models add` writes, without its load-and-probe check."""
    import shutil

    from snaplearn_vision.schema import FORMAT_FILENAMES, BatchingConfig, ModelConfig

    directory = root / name / "1"
    directory.mkdir(parents=True, exist_ok=True)
    weights = FORMAT_FILENAMES.get(fmt, "model.pt")
    config = ModelConfig(
        architecture=model_spec["architecture"] if fmt == "state_dict" else "",
        labels=tuple(model_spec["labels"]),
        input_size=(model_spec["size"][0], model_spec["size"][1]),
        channels=model_spec["channels"],
        mean=tuple(model_spec["mean"]),
        std=tuple(model_spec["std"]),
        batching=BatchingConfig(max_batch_size=max_batch_size, max_queue_delay_ms=5.0),
        weights=weights,
        format=fmt,  # type: ignore[arg-type]
        training={"weights": "random" if not model_spec["weights"] else "trained"},
    )
    target = directory / weights
    target.unlink(missing_ok=True)
    try:
        target.hardlink_to(file)
    except OSError:
        shutil.copyfile(file, target)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def _bare_runner(fmt: str, file: str, model_spec: dict[str, Any], device: str, dtype: str, nhwc: bool) -> Any:
    """A function batch -> output for `file` in its own runtime (torch tensors in, any out)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = onnxruntime.InferenceSession(file, options, providers=providers)
        name = session.get_inputs()[0].name

        def run_onnx(batch: Any) -> Any:
            return session.run(None, {name: batch.cpu().numpy()})[0]

        return run_onnx
    if fmt == "torchscript":
        module = torch.jit.load(file, map_location=device).eval()
    elif fmt == "torch_export":
        module = torch.export.load(file).module().to(device)
    else:
        module = build(model_spec).to(device)
    module = module.to(torch_dtype)
    if nhwc:
        module = module.to(memory_format=torch.channels_last)
    if fmt == "torchscript":
        # Frozen (after the casts: freezing inlines the weights), as a careful user and our
        # engine run a TorchScript file for inference.
        module = torch.jit.freeze(module)

    def run_torch(batch: Any) -> Any:
        with torch.inference_mode():
            return module(batch)

    return run_torch


def bare_bound(
    fmt: str,
    file: str,
    model_spec: dict[str, Any],
    batch_sizes: list[int],
    seconds: float,
    device: str = "cpu",
    dtype: str = "fp32",
    nhwc: bool = False,
) -> dict[str, Any]:
    """Images per second of the bare runtime at each batch size, and the best."""
    import torch

    run = _bare_runner(fmt, file, model_spec, device, dtype, nhwc)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if fmt == "onnx":
        torch_dtype = torch.float32  # the exported graph's own input type
    height, width = model_spec["size"]
    rates: dict[str, float] = {}
    for batch_size in batch_sizes:
        batch = torch.rand(batch_size, model_spec["channels"], height, width).to(device, torch_dtype)
        if nhwc and fmt != "onnx":
            batch = batch.contiguous(memory_format=torch.channels_last)
        for _ in range(2):  # first calls: allocation, cuDNN/oneDNN choices, profiling executors
            run(batch)
        _sync(device)
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or images == 0:
            run(batch)
            images += batch_size
        _sync(device)
        rates[str(batch_size)] = images / (time.perf_counter() - started)
    best = max(rates, key=lambda size: rates[size])
    return {"images_per_s": rates[best], "best_batch_size": int(best), "by_batch_size": rates}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="spec + every format's file + version folders")
    export.add_argument("--model", required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--formats", default=",".join(FORMATS[:3]))
    export.add_argument("--default-root", type=Path, default=None, help="where the default model is")
    export.add_argument("--repository", type=Path, default=None, help="also write version folders here")
    export.add_argument("--max-batch-size", type=int, default=16)
    export.add_argument("--size", type=int, default=224, help="input size of a torchvision model")
    bare = commands.add_parser("bare", help="the bare runtime's images/s")
    bare.add_argument("--file", required=True)
    bare.add_argument("--format", choices=FORMATS, required=True)
    bare.add_argument("--spec", required=True, help="spec() as JSON")
    bare.add_argument("--batch-sizes", default="1,8,16")
    bare.add_argument("--seconds", type=float, default=3.0)
    bare.add_argument("--torch-threads", type=int, default=1)
    bare.add_argument("--device", default="cpu")
    bare.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    bare.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_flush_denormal(True)  # as every contender (snaplearn_bench.raw.apply_torch_settings)
    if args.command == "export":
        model_spec = spec(args.model, args.default_root, args.size)
        network = build(model_spec)
        height, width = model_spec["size"]
        example = torch.rand(2, model_spec["channels"], height, width)
        formats = [fmt for fmt in args.formats.split(",") if fmt]
        result = export_network(network, example, args.out, args.model, formats)
        result["spec"] = model_spec
        if args.repository is not None:
            for fmt, file in result["files"].items():
                name = served_name(args.model, fmt)
                write_version(args.repository, name, file, fmt, model_spec, args.max_batch_size)
    else:
        torch.set_num_threads(args.torch_threads)
        sizes = [int(size) for size in args.batch_sizes.split(",")]
        result = bare_bound(
            args.format, args.file, json.loads(args.spec), sizes, args.seconds,
            args.device, args.dtype, args.channels_last,
        )  # fmt: skip
    json.dump(result, sys.stdout)
    print()
    return 0


def served_name(model: str, fmt: str) -> str:
    """The repository name of `model` in `fmt` (a model name: letters, digits, '-' and '_')."""
    return f"{model}-{fmt}".replace("_", "-")


if __name__ == "__main__":
    sys.exit(main())
