"""`snaplearn up`: start the whole system on one machine and show it working.

Trains the default vision model if the model repository has none, starts the vision
server and the recommender (each its own process, on the embedded event bus by
default), runs the demo against them, then keeps them running until Ctrl-C.

Every step is a child process (`python -m snaplearn_vision.train`, the two servers, the
worksheet renderer, `snaplearn_client.cli demo`), so this module imports none of the vision,
recommender or client packages: snaplearn-common stays free of torch and LightFM.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field

from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.security.settings import SecuritySettings
from snaplearn_common.settings import Cli, Settings, SettingsConfigDict, none_for


class LaunchSettings(Settings):
    """snaplearn up: train the default model if needed, start the vision server and the
    recommender, run the demo against them, and serve until Ctrl-C."""

    model_config = SettingsConfigDict(env_prefix="SNAPLEARN_LAUNCH_")
    cli_prog: ClassVar[str | None] = "snaplearn up"

    data_dir: Path = Field(
        default=Path("var"),
        validation_alias="SNAPLEARN_DATA_DIR",
        description="models, the embedded bus, logs and state go here",
    )
    host: str = Field(default="127.0.0.1", description="interface both servers bind")
    vision_port: Annotated[int, Field(ge=0, le=65535, description="vision gRPC port (0 picks one)")] = 50051
    vision_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9101
    recommender_port: Annotated[int, Field(ge=0, le=65535)] = 50052
    recommender_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9102
    demo: bool = Field(default=True, description="run the demo once the servers are ready")
    exit_after_demo: bool = Field(default=False, description="stop once the demo has run (smoke test)")
    ready_timeout_s: Annotated[float, Cli(flag="--ready-timeout"), Field(gt=0)] = 180.0
    # Each server has flags of its own (the recommender's --catalog would kill the vision server),
    # so they are forwarded to that server only, after the launcher's own (which they may override).
    vision_args: str = Field(default="", description="more flags for the vision server only, as one string")
    recommender_args: str = Field(
        default="", description="more flags for the recommender only, e.g. '--catalog my.csv', as one string"
    )
    label_map: Annotated[Path | None, none_for("")] = Field(
        default=None, description="JSON {vision label: [concepts]}: given to the recommender and to the demo"
    )
    # Both servers get these as flags (bus_flags); the embedded bus lives in data_dir unless
    # --bus-path (or SNAPLEARN_BUS_PATH) says otherwise.
    bus: BusSettings = Field(default_factory=BusSettings)

    def bus_flags(self) -> list[str]:
        """The bus settings as the servers' flags (secrets stay in the inherited environment)."""
        bus = self.bus
        if "embedded_path" not in bus.model_fields_set:
            bus = bus.model_copy(update={"embedded_path": str(self.data_dir / "bus.db")})
        flags: list[str] = []
        for name in BusSettings.model_fields:
            flag = BusSettings.flag_of(name)
            if flag is not None:
                flags += [flag, str(getattr(bus, name))]
        return flags

    def ports(self) -> list[tuple[str, str, int]]:
        """(what, its flag, port) for every port the launcher's servers bind; 0 picks a free one."""
        return [
            ("vision gRPC", "--vision-port", self.vision_port),
            ("vision metrics", "--vision-metrics-port", self.vision_metrics_port),
            ("recommender gRPC", "--recommender-port", self.recommender_port),
            ("recommender metrics", "--recommender-metrics-port", self.recommender_metrics_port),
        ]

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"


class ManagedProcess:
    """A child server process whose output goes to a log file and who reports readiness via a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, ready_file: Path) -> None:
        self.name, self.argv, self.log_path, self.ready_file = name, list(argv), log_path, ready_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Own process group: a Ctrl-C in the terminal reaches the launcher, which then drains children.
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout_s: float) -> dict[str, int]:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                try:
                    return dict(json.loads(self.ready_file.read_text()))
                except json.JSONDecodeError:
                    pass  # being written; read again
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def ensure_default_model(settings: LaunchSettings) -> None:
    """Train the default model unless the repository already has it (progress bar on the terminal)."""
    command = [sys.executable, "-m", "snaplearn_vision.train", "--repository", str(settings.models_dir)]
    subprocess.run([*command, "--if-missing"], check=True)


def render_demo_photos(settings: LaunchSettings) -> Path:
    """Sample worksheet photos for the demo, rendered once into the data folder."""
    folder = settings.data_dir / "demo-photos"
    if not any(folder.glob("*/*.png")):
        command = [
            sys.executable,
            "-m",
            "snaplearn_vision.worksheets",
            "--out",
            str(folder),
            "--per-topic",
            "6",
        ]
        subprocess.run(command, check=True)
    return folder


def demo_command(settings: LaunchSettings, vision: str, recommender: str, photos: Path) -> list[str]:
    command = [
        sys.executable, "-m", "snaplearn_client.cli", "--vision", vision, "--recommender", recommender,
        "demo", "--photos", str(photos),
    ]  # fmt: skip
    if settings.label_map is not None:  # the demo judges recommendations by the concepts photos map to
        command += ["--label-map", str(settings.label_map)]
    return command


def run_demo(settings: LaunchSettings, vision: str, recommender: str) -> int:
    photos = render_demo_photos(settings)
    return subprocess.run(demo_command(settings, vision, recommender, photos)).returncode


class LaunchError(Exception):
    """Why `snaplearn up` cannot go on, in words for its user (printed without a traceback)."""


def check_ports_free(settings: LaunchSettings) -> None:
    """Raise LaunchError naming the first port (and its flag) another process holds."""
    for what, flag, port in settings.ports():
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
            try:
                probe.bind((settings.host, port))
            except OSError as error:
                raise LaunchError(
                    f"port {port} on {settings.host} ({what}) is in use ({error.strerror}); stop what "
                    f"holds it, or pick another with {flag} PORT ({flag} 0 picks a free one)"
                ) from None


def server_processes(settings: LaunchSettings) -> list[ManagedProcess]:
    data, logs, host = settings.data_dir, settings.logs_dir, settings.host
    vision = ManagedProcess(
        "vision server",
        [
            sys.executable, "-m", "snaplearn_vision.main",
            "--host", host, "--port", str(settings.vision_port),
            "--metrics-port", str(settings.vision_metrics_port),
            "--model-repository", str(settings.models_dir),
            "--spool-dir", str(data / "spool"),
            "--ready-file", str(data / "run" / "vision.json"),
            *settings.bus_flags(),
            *_split(settings.vision_args, "--vision-args"),
        ],
        logs / "vision.log",
        data / "run" / "vision.json",
    )  # fmt: skip
    recommender = ManagedProcess(
        "recommender",
        [
            sys.executable, "-m", "snaplearn_recommender.main",
            "--host", host, "--port", str(settings.recommender_port),
            "--metrics-port", str(settings.recommender_metrics_port),
            "--checkpoint-dir", str(data / "recommender"),
            "--ready-file", str(data / "run" / "recommender.json"),
            *settings.bus_flags(),
            *(["--label-map", str(settings.label_map)] if settings.label_map is not None else []),
            *_split(settings.recommender_args, "--recommender-args"),
        ],
        logs / "recommender.log",
        data / "run" / "recommender.json",
    )  # fmt: skip
    return [vision, recommender]


def _split(flags: str, source: str) -> list[str]:
    try:
        return shlex.split(flags)
    except ValueError as error:
        raise LaunchError(f"{source}: {error}") from None


def up(settings: LaunchSettings) -> int:
    try:
        check_ports_free(settings)
        processes = server_processes(settings)  # bad --vision-args / --recommender-args: said here
    except LaunchError as error:
        print(f"snaplearn up: error: {error}", file=sys.stderr)
        return 1
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"== SnapLearn: data in {settings.data_dir}, logs in {settings.logs_dir}", flush=True)
    ensure_default_model(settings)
    stop_requested = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    try:
        for process in processes:
            process.start()
        try:
            ports = [process.wait_ready(settings.ready_timeout_s) for process in processes]
        except (RuntimeError, TimeoutError) as error:  # a server that exited or never got ready
            print(f"snaplearn up: error: {error}", file=sys.stderr)
            return 1
        vision_ports, recommender_ports = ports
        vision = f"{settings.host}:{vision_ports['port']}"
        recommender = f"{settings.host}:{recommender_ports['port']}"
        print(
            f"== vision server  {vision}  (metrics http://{settings.host}:{vision_ports['metrics_port']}/metrics)"
        )
        print(
            f"== recommender    {recommender}  "
            f"(metrics http://{settings.host}:{recommender_ports['metrics_port']}/metrics)",
            flush=True,
        )
        security = SecuritySettings.from_env()  # what the servers read from the same environment
        if not (security.tls or security.authentication):
            print("== plaintext, no tokens: for localhost development only (TLS and tokens: DECISIONS D45)")
        demo_rc = 0
        if settings.demo:
            demo_rc = run_demo(settings, vision, recommender)
        if settings.exit_after_demo:
            return demo_rc
        print("\n== SnapLearn is running. Try:")
        print(f"   .venv/bin/snaplearn-client --recommender {recommender} recommend --user demo-ada")
        print("   Ctrl-C stops everything (servers drain in-flight calls first).", flush=True)
        while not stop_requested.wait(0.5):
            for process in processes:
                if process.process is not None and process.process.poll() is not None:
                    print(f"{process.name} exited unexpectedly:\n{process.log_tail()}", file=sys.stderr)
                    return 1
        return 0
    finally:
        print("\n== stopping SnapLearn", flush=True)
        for process in reversed(processes):
            process.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "up":
        print("usage: snaplearn up [--help] [flags]", file=sys.stderr)
        return 2
    return up(LaunchSettings.from_argv(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
