"""Manage the model repository: `snaplearn-vision models add | list | remove`.

    snaplearn-vision models add NAME --file model.onnx --labels labels.txt [--format onnx]
        [--input-size H W] [--channels 3] [--mean ...] [--std ...] [--resize center_crop]
        [--max-batch-size 32] [--version N] [--repository var/models]
    snaplearn-vision models list [NAME] [--check] [--json]
    snaplearn-vision models remove NAME VERSION

`add` stages the new version in a hidden folder beside the model's versions
(<root>/<name>/.add-XXXX: the repository lists only <root>/<name>/<integer>), copies the file and
writes config.json there durably, loads it as the server would and runs test batches of 1 and
2 images (it runs, takes config.json's input, returns one score per label per image, its batch
dimension is not fixed), and only then renames the folder to its version number: a running server
(or a crash) sees the whole version or none of it, never one that cannot load. The server warms
every batch size before a version takes a call and refuses (never swaps in) one that fails there,
so the command does not run those batches a second time (D49).

With `--server HOST:PORT` the command then asks that server to load the model now
(RepositoryModelLoad), instead of leaving it to the server's next poll, waits until it serves,
and reads the version's state back (RepositoryIndex): a version the server refused is taken
out of the repository again and the command fails. TLS: `--tls-ca`; a token from SNAPLEARN_TOKEN.
`remove` renames the version away first, for the same reason, then deletes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaplearn_common.errors import NotFound, SnapLearnError, Unavailable
from snaplearn_common.files import atomic_write, fsync_directory
from snaplearn_vision.core.versions import READY
from snaplearn_vision.runtime.engine import InferenceSettings
from snaplearn_vision.runtime.formats import declared_input
from snaplearn_vision.runtime.model_repository import ModelRepository, load_version_directory
from snaplearn_vision.schema import (
    CONFIG_FILENAME,
    FORMAT_FILENAMES,
    MODEL_FORMATS,
    NAME_PATTERN,
    RESIZE_POLICIES,
    VERSION_PATTERN,
    BatchingConfig,
    InvalidModelConfig,
    ModelConfig,
)

REPOSITORY_ENV = "SNAPLEARN_VISION_MODEL_REPOSITORY"  # the server's own --model-repository variable
DEFAULT_REPOSITORY = "var/models"
# The usual normalisation of ImageNet-trained networks, the common case for a user's RGB model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5,)
GREY_STD = (0.25,)
DEFAULT_USER_INPUT_SIZE = (224, 224)
_SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "torch_export"}
# How long `--server` waits for the server to load and warm a version: a large network on a
# busy CPU takes minutes in the worst case.
SERVER_LOAD_TIMEOUT_S = 600.0
TOKEN_ENV = "SNAPLEARN_TOKEN"  # as the client library: a token is never a flag (process listings)


class ModelAdminError(SnapLearnError):
    """A `models` command that cannot do what it was asked (bad arguments, version exists)."""


@dataclass(frozen=True)
class AddedVersion:
    name: str
    version: str
    config: ModelConfig
    load_s: float
    tested_batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: str
    format: str
    file: str
    labels: int
    input: str
    state: str  # "ready", or "invalid: <why>" / "broken: <why>"


def detect_format(file: Path, architecture: str | None) -> str:
    """A format from the file name: .onnx, .pt2; .pt/.pth is a state_dict with --architecture,
    else TorchScript."""
    suffix = file.suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    return "state_dict" if architecture else "torchscript"


def read_labels(path: Path) -> tuple[str, ...]:
    """labels.txt: one label per line, in the model's output order; blank lines are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ModelAdminError(f"cannot read labels file {path.name}: {error.strerror}") from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise ModelAdminError(f"labels file {path.name} has no labels (one per line)")
    return labels


def next_version(repository: ModelRepository, name: str) -> str:
    try:
        return str(int(repository.latest_version(name)) + 1)
    except NotFound:
        return "1"


def build_config(
    file: Path,
    labels: Sequence[str],
    model_format: str,
    *,
    architecture: str | None = None,
    input_size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: str = "stretch",
    max_batch_size: int = BatchingConfig.max_batch_size,
    max_queue_delay_ms: float = BatchingConfig.max_queue_delay_ms,
    min_confidence: float = 0.0,
) -> ModelConfig:
    """config.json for a new version: what was given, else what the file declares, else defaults."""
    declared = declared_input(model_format, file) or (None, None, None)
    channels = channels or declared[0] or 3
    if input_size is None:
        if declared[1] is not None and declared[2] is not None:
            input_size = (declared[1], declared[2])
        else:
            input_size = DEFAULT_USER_INPUT_SIZE
    if mean is None:
        mean = IMAGENET_MEAN if channels == 3 else GREY_MEAN
    if std is None:
        std = IMAGENET_STD if channels == 3 else GREY_STD
    return ModelConfig(
        architecture=architecture or "",
        labels=tuple(labels),
        input_size=(int(input_size[0]), int(input_size[1])),
        channels=int(channels),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        batching=BatchingConfig(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms),
        weights=FORMAT_FILENAMES[model_format],
        training={"source_file": file.name, "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        format=model_format,  # type: ignore[arg-type]  # checked by ModelConfig
        resize=resize,  # type: ignore[arg-type]
        min_confidence=min_confidence,
    )


def _copy_durably(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        shutil.copyfileobj(reader, writer, length=1 << 20)
        writer.flush()
        os.fsync(writer.fileno())


def add_version(
    root: str | os.PathLike[str],
    name: str,
    file: str | os.PathLike[str],
    config: ModelConfig,
    version: str | None = None,
    device: str = "cpu",
) -> AddedVersion:
    """Stages, loads, checks and warms a new version, then makes it visible in one rename.

    Raises ModelAdminError, InvalidModelConfig or ModelLoadError; nothing is left behind then.
    """
    if not NAME_PATTERN.match(name):
        raise ModelAdminError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
    source = Path(file)
    if not source.is_file():
        raise ModelAdminError(f"model file {source.name} does not exist")
    repository = ModelRepository(root)
    version = version or next_version(repository, name)
    if not VERSION_PATTERN.match(version):
        raise ModelAdminError(f"model version {version!r} must be a positive integer")
    model_dir = repository.root / name
    target = model_dir / version
    if target.exists():
        raise ModelAdminError(
            f"model {name!r} already has version {version}; remove it first or pick another"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".add-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the server may run as another user
    try:
        _copy_durably(source, staging / config.weights)
        # torch.onnx keeps large weights in "<file>.data" beside the graph, which names it:
        # it travels under its own name.
        external = source.with_name(source.name + ".data")
        if config.format == "onnx" and external.is_file():
            _copy_durably(external, staging / external.name)
        atomic_write(staging / CONFIG_FILENAME, json.dumps(config.to_dict(), indent=2) + "\n")
        started = time.perf_counter()
        tested = tuple(sorted({1, min(2, config.batching.max_batch_size)}))
        # Loaded as the server loads it, but not frozen: freezing is an optimisation of the
        # server's (it falls back to eager, never fails a load) and costs seconds here. The
        # load's own check (batches of 1 and 2) is the test: the largest batches cost the most
        # and the server runs every batch size itself before the version takes a call.
        classifier = load_version_directory(
            staging, name, version, device=device, inference=InferenceSettings(torchscript=False)
        )
        load_s = time.perf_counter() - started
        classifier.close()
        try:
            # rename(2) replaces an empty directory silently: refuse a target that appeared.
            if target.exists():
                raise FileExistsError(target)
            staging.rename(target)
        except OSError:
            raise ModelAdminError(f"model {name!r} version {version} was added concurrently") from None
        fsync_directory(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return AddedVersion(name, version, config, load_s, tested)


@dataclass(frozen=True)
class ServerState:
    """A version's state on a running server after `load_on_server` (RepositoryIndex's row)."""

    state: str
    reason: str
    seconds: float


def load_on_server(
    target: str,
    name: str,
    version: str,
    *,
    tls_ca: Path | None = None,
    token: str | None = None,
    timeout_s: float = SERVER_LOAD_TIMEOUT_S,
) -> ServerState:
    """Asks the server at `target` to load `name` now (RepositoryModelLoad: the versions its policy
    selects are loaded, warmed and swapped in before it answers), then reads `version`'s state
    there (RepositoryIndex). Raises Unavailable when the server does not do it.

    Under `--workers N` the call reaches one worker; the others load at their next poll.
    """
    import grpc  # only this path talks to a server

    from snaplearn_oip import grpc_service_pb2 as oip
    from snaplearn_oip import grpc_service_pb2_grpc as oip_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    if tls_ca is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
    else:
        channel = grpc.insecure_channel(target)
    started = time.perf_counter()
    with channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        try:
            try:
                stub.RepositoryModelLoad(
                    oip.RepositoryModelLoadRequest(model_name=name), timeout=timeout_s, metadata=metadata
                )
            except grpc.RpcError as error:
                # FAILED_PRECONDITION: no version of the model could load; the index says why ours not.
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
            index = stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=60, metadata=metadata)
        except grpc.RpcError as error:
            raise Unavailable(
                f"the server at {target} did not load {name}: {error.code().name}: {error.details()}"
            ) from None
    seconds = time.perf_counter() - started
    for row in index.models:
        if (row.name, row.version) == (name, version):
            return ServerState(row.state, row.reason, seconds)
    return ServerState("", "not in the server's repository (is --repository the server's?)", seconds)


def remove_version(root: str | os.PathLike[str], name: str, version: str) -> None:
    """Takes a version out of the repository in one rename (a poller sees it gone), then deletes it."""
    repository = ModelRepository(root)
    _, directory = repository.resolve(name, version)  # NotFound lists what exists
    doomed = directory.parent / f".remove-{version}-{os.getpid()}-{time.monotonic_ns()}"
    directory.rename(doomed)
    fsync_directory(directory.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def list_versions(
    root: str | os.PathLike[str], name: str | None = None, check: bool = False
) -> list[VersionRow]:
    """Every version with its state: "ready" when its config is valid and its file is there
    ("ready" with check=True: it also loaded, passed its probe batches and warmed up)."""
    repository = ModelRepository(root)
    names = [name] if name else repository.list_models()
    rows = []
    for model in names:
        for version in repository.list_versions(model):
            rows.append(_row(repository, model, version, check))
    return rows


def _row(repository: ModelRepository, name: str, version: str, check: bool) -> VersionRow:
    try:
        config = repository.load_config(name, version)
    except InvalidModelConfig as error:
        return VersionRow(name, version, "?", "?", 0, "?", f"invalid: {error}")
    state = "ready"
    directory = repository.root / name / version
    if config.pretrained is None and not (directory / config.weights).is_file():
        state = f"broken: {config.weights} is missing"
    elif check:
        try:
            classifier = repository.load(name, version, device="cpu")
            try:
                classifier.warm_up()
            finally:
                classifier.close()
        except SnapLearnError as error:
            state = f"broken: {error}"
    shape = f"{config.channels}x{config.input_size[0]}x{config.input_size[1]}"
    return VersionRow(name, version, config.format, config.weights, len(config.labels), shape, state)


# -- the command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snaplearn-vision models",
        description="Add, list and remove model versions in the vision server's model repository.",
    )
    default_root = os.environ.get(REPOSITORY_ENV, DEFAULT_REPOSITORY)
    parser.add_argument(
        "--repository",
        default=default_root,
        help=f"model repository root (${REPOSITORY_ENV}; {DEFAULT_REPOSITORY})",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    # --repository also after the subcommand (`models add NAME ... --repository DIR`).
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--repository", default=argparse.SUPPRESS, help="model repository root")
    add = commands.add_parser(
        "add", parents=[where], help="add a version: staged, loaded, tested, then made visible"
    )
    add.add_argument("name")
    add.add_argument("--file", required=True, type=Path, help="model.pt | model.pt2 | model.onnx")
    add.add_argument("--labels", required=True, type=Path, help="labels.txt, one per line, output order")
    add.add_argument("--format", choices=("auto", *MODEL_FORMATS), default="auto")
    add.add_argument("--architecture", help="for --format state_dict: snapnet or a torchvision name")
    add.add_argument("--version", help="default: one more than the latest")
    add.add_argument("--input-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"))
    add.add_argument("--channels", type=int, choices=(1, 3))
    add.add_argument("--mean", type=float, nargs="+", help="per channel, on a 0..1 scale")
    add.add_argument("--std", type=float, nargs="+", help="per channel, on a 0..1 scale")
    add.add_argument("--resize", choices=RESIZE_POLICIES, default="stretch")
    add.add_argument("--max-batch-size", type=int, default=BatchingConfig.max_batch_size)
    add.add_argument("--max-queue-delay-ms", type=float, default=BatchingConfig.max_queue_delay_ms)
    add.add_argument(
        "--min-confidence", type=float, default=0.0, help="below this top score: not recognised (0 = off)"
    )
    add.add_argument(
        "--device", choices=("cpu", "auto", "cuda"), default="cpu", help="where the test load runs"
    )
    add.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="a running vision server: it loads the version now (RepositoryModelLoad), not at its next "
        f"poll; a version it refuses is taken back (token: ${TOKEN_ENV})",
    )
    add.add_argument("--tls-ca", type=Path, help="with --server: the CA certificate of its TLS (PEM)")

    listing = commands.add_parser("list", parents=[where], help="versions and their states")
    listing.add_argument("name", nargs="?")
    listing.add_argument("--check", action="store_true", help="load and warm each version (slow)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    remove = commands.add_parser("remove", parents=[where], help="remove one version")
    remove.add_argument("name")
    remove.add_argument("version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "add":
            return _add(args)
        if args.command == "list":
            return _list(args)
        remove_version(args.repository, args.name, args.version)
        print(f"removed {args.name} version {args.version}")
        return 0
    except (SnapLearnError, ValueError) as error:  # ValueError: InvalidModelConfig among them
        print(f"error: {error}", file=sys.stderr)
        return 1


def _add(args: argparse.Namespace) -> int:
    model_format = detect_format(args.file, args.architecture) if args.format == "auto" else args.format
    config = build_config(
        args.file,
        read_labels(args.labels),
        model_format,
        architecture=args.architecture,
        input_size=tuple(args.input_size) if args.input_size else None,
        channels=args.channels,
        mean=args.mean,
        std=args.std,
        resize=args.resize,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        min_confidence=args.min_confidence,
    )
    added = add_version(args.repository, args.name, args.file, config, args.version, device=args.device)
    sizes = ", ".join(str(size) for size in added.tested_batch_sizes)
    print(
        f"added {added.name} version {added.version}: {config.format}, {len(config.labels)} labels, "
        f"input {config.channels}x{config.input_size[0]}x{config.input_size[1]}; loaded in "
        f"{added.load_s:.2f}s, tested at batch sizes {sizes}",
        flush=True,
    )
    if args.server:
        return _load_on_server(args, added)
    return 0


def _load_on_server(args: argparse.Namespace, added: AddedVersion) -> int:
    where = f"server {args.server}"
    try:
        on_server = load_on_server(
            args.server, added.name, added.version, tls_ca=args.tls_ca, token=os.environ.get(TOKEN_ENV)
        )
    except Unavailable as error:
        print(f"warning: {error}; the server picks the version up at its next poll", file=sys.stderr)
        return 0
    if on_server.state == READY:
        print(f"{where} serves {added.name} version {added.version} (loaded in {on_server.seconds:.2f}s)")
        return 0
    if on_server.reason.startswith("failed to load"):
        # The server's warm-up ran a batch size the command's test did not: it stays out.
        remove_version(args.repository, added.name, added.version)
        print(
            f"error: {where} refused {added.name} version {added.version} ({on_server.reason}); "
            "the version was taken out of the repository again",
            file=sys.stderr,
        )
        return 1
    print(f"{where}: {added.name} version {added.version} is {on_server.state or '?'}: {on_server.reason}")
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = list_versions(args.repository, args.name, check=args.check)
    if args.json:
        for row in rows:
            print(json.dumps(dataclasses.asdict(row)))
        return 0
    header = ("NAME", "VERSION", "FORMAT", "FILE", "LABELS", "INPUT", "STATE")
    table: list[tuple[Any, ...]] = [header] + [
        (r.name, r.version, r.format, r.file, r.labels, r.input, r.state) for r in rows
    ]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header) - 1)]
    for line in table:
        print(
            "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False))
            + f"  {line[-1]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
