"""Servers, peers and the Go commands as processes of a benchmark run.

A server is ready either when a line of its stdout says so (`process`: the gateway, the peers)
or when it has written its ready file (`ready_file_process`: our servers, which write host,
port, metrics_port and pid there). Either way it is stopped with SIGTERM to its process group
(worker processes included) when the block ends, and SIGKILL if it does not drain in time.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from snaplearn_bench.paths import BENCH_DIR, PY, REPO, RUNS_DIR, log

# Where the Python packages live in a checkout, so that a checkout's own code runs (an A/B's
# baseline): protos/python since issue 18's layout, clients/python before it.
PACKAGE_DIRS = ("protos/python", "services", "vision_server", "recommender_worker", "clients/python")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torch_env(torch_threads: int, code: Path | None = None) -> dict[str, str]:
    """The environment of a process that runs torch: `torch_threads` OpenMP threads, the harness
    importable, and with `code` (a checkout) that checkout's packages ahead of the installed ones."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads), "PYTHONPATH": str(BENCH_DIR)}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([*(str(code / d) for d in PACKAGE_DIRS), str(BENCH_DIR)])
    return env


def _stop(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def process(
    argv: Sequence[str], env: dict[str, str], ready: str, timeout_s: float = 180
) -> Iterator[subprocess.Popen[str]]:
    """Start a server; yield once a stdout line contains `ready`; stop it afterwards."""
    proc = subprocess.Popen(
        list(argv),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    last_lines: collections.deque[str] = collections.deque(maxlen=3)  # for the error, if it fails
    try:
        for line in proc.stdout:
            if ready in line:
                break
            last_lines.append(line.strip()[-200:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{list(argv)[:4]} not ready in {timeout_s}s")
        else:
            raise RuntimeError(
                f"{list(argv)[:4]} exited with {proc.wait()} before it was ready; its last output: "
                + " | ".join(last_lines)
            )
        # Keep reading: a server whose stdout pipe fills blocks on its next log line (Ray Serve
        # logs every request, and a stalled driver slows its whole app).
        threading.Thread(target=collections.deque, args=(proc.stdout, 0), daemon=True).start()
        yield proc
    finally:
        _stop(proc)
        time.sleep(1.0)  # let the CPU settle before the next contender


class ReadyFileProcess:
    """A started server that announced itself in its ready file (`info`: host, port, ...)."""

    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any], log_path: Path) -> None:
        self.proc, self.info, self.log_path = proc, info, log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.info['port']}"


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@contextlib.contextmanager
def ready_file_process(
    name: str,
    argv: Sequence[str],
    ready_file: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 180,
) -> Iterator[ReadyFileProcess]:
    """Start `argv` (which must write `ready_file`), output into `log_path`; yield once the
    ready file is there; stop it afterwards. A server that exits or times out first raises,
    with the tail of its log."""
    ready_file.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as output:
        proc = subprocess.Popen(
            list(argv), env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        info: dict[str, Any] | None = None
        while info is None:
            if ready_file.exists():
                with contextlib.suppress(json.JSONDecodeError):  # written atomically, but be lenient
                    info = dict(json.loads(ready_file.read_text()))
                    continue
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {timeout_s:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.05)
        yield ReadyFileProcess(proc, info, log_path)
    finally:
        _stop(proc)


# -- Go commands ------------------------------------------------------------------------------------

# command -> [(module folder in a checkout, package in it)], newest layout first: issue 18 gave
# each command a module of its own; before it both were packages of the Go client's module.
GO_COMMANDS: dict[str, tuple[tuple[str, str], ...]] = {
    "snaplearn-gateway": (("services/gateway", "."), ("clients/go", "./cmd/snaplearn-gateway")),
    "snaplearn-loadgen": (("benchmarks/loadgen", "."), ("clients/go", "./cmd/snaplearn-loadgen")),
}


def go_module(name: str, checkout: Path = REPO) -> tuple[Path, str]:
    """(module folder, package) of the Go command `name` in the checkout at `checkout`, in
    whichever layout that checkout has; LookupError if it has none."""
    for folder, package in GO_COMMANDS[name]:
        module = checkout / folder
        if (module / "go.mod").exists() and (module / package / "main.go").exists():
            return module, package
    raise LookupError(f"{name} is not in {checkout} (looked for {GO_COMMANDS[name]})")


def go_command(name: str, flag: str, hint: str, checkout: Path = REPO) -> Path:
    """`go build` the command `name` of the checkout at `checkout` (this one by default) into its
    module's bin/; SystemExit, naming `flag` and `hint` (the way around it), if it cannot."""
    try:
        module, package = go_module(name, checkout)
    except LookupError as error:
        raise SystemExit(f"{flag}: {error}; {hint}") from None
    go = shutil.which("go")
    if go is None:
        raise SystemExit(f"{flag}: the go toolchain is not on PATH; install Go, {hint}")
    binary = module / "bin" / name
    log(f"building {binary.relative_to(checkout)} in {checkout}")
    out = subprocess.run(
        [go, "build", "-o", str(binary), package], cwd=module, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(
            f"{flag}: `go build {package}` in {module} failed "
            f"({out.returncode}): {(out.stdout + out.stderr).strip()[-2000:]}\nFix the build, {hint}"
        )
    return binary


def loadgen_binary() -> Path:
    """The Go load generator (benchmarks/loadgen), built from this checkout: the one place that
    knows where it lives."""
    hint = "or pass --load-generator python to use snaplearn_bench.pyloadgen instead"
    return go_command("snaplearn-loadgen", "--load-generator go", hint)


def gateway_binary(flag: str, hint: str, checkout: Path = REPO) -> Path:
    """snaplearn-gateway built from the checkout at `checkout` (this one by default)."""
    return go_command("snaplearn-gateway", flag, hint, checkout)


@contextlib.contextmanager
def git_checkout(ref: str) -> Iterator[Path]:
    """A detached worktree of `ref` under var/bench-runs for the duration of the block."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    path = RUNS_DIR / f"ab-{sha[:12]}"
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    if path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), sha], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory under var/bench-runs, removed afterwards."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=RUNS_DIR) as tmp:
        yield Path(tmp)


# -- the SnapLearn stack, as `make up` runs it ----------------------------------------------------


def bus_flags(backend: str, workdir: Path, bootstrap: str, topic: str) -> list[str]:
    """The servers' bus flags: Kafka at `bootstrap`, or the embedded bus in `workdir`."""
    if backend == "kafka":
        return ["--bus", "kafka", "--kafka-bootstrap", bootstrap, "--bus-topic", topic]
    return ["--bus", "embedded", "--bus-path", str(workdir / "bus.db"), "--bus-topic", topic]


@contextlib.contextmanager
def vision_server_process(
    workdir: Path, models: Path, bus: Sequence[str], name: str = "vision"
) -> Iterator[ReadyFileProcess]:
    """`python -m snaplearn_vision.main` on free ports, publishing with `bus` flags, its spool,
    log and ready file under `workdir`."""
    ready = workdir / "run" / f"{name}.json"
    argv = [
        PY, "-m", "snaplearn_vision.main", "--port", "0", "--metrics-port", "0",
        "--model-repository", str(models), "--spool-dir", str(workdir / f"spool-{name}"),
        "--ready-file", str(ready), *bus,
    ]  # fmt: skip
    with ready_file_process(name, argv, ready, workdir / "logs" / f"{name}.log") as server:
        yield server


@contextlib.contextmanager
def recommender_process(
    workdir: Path, checkpoints: Path, bus: Sequence[str], group: str, name: str = "recommender"
) -> Iterator[ReadyFileProcess]:
    """`python -m snaplearn_recommender.main` on free ports, consuming with `bus` flags as
    consumer group `group`; stopped with SIGTERM, so its worker writes its checkpoint."""
    ready = workdir / "run" / f"{name}.json"
    argv = [
        PY, "-m", "snaplearn_recommender.main", "--port", "0", "--metrics-port", "0",
        "--checkpoint-dir", str(checkpoints), "--consumer-group", group,
        "--ready-file", str(ready), *bus,
    ]  # fmt: skip
    with ready_file_process(name, argv, ready, workdir / "logs" / f"{name}.log") as server:
        yield server
