"""Worker processes behind one port: `snaplearn-vision --workers N`.

One Python process cannot keep its cores busy with a small model: the event loop (grpc.aio's
per-call work) and the decode threads share one GIL (docs/BENCHMARKS.md). N workers are N
whole servers, each with its own interpreter, event loop, decode threads and model copy,
listening on the same port with SO_REUSEPORT; the kernel hands each new connection to one of
them. This supervisor:

- reserves the port: binds it with SO_REUSEPORT and never listens, so port 0 becomes one
  concrete port every worker joins, and no other program takes it while workers restart;
- starts the workers and waits until each has loaded its model and joined the port (a
  worker listens only once it can answer), then writes the ready file and the ready line;
- with a rate limit, creates the one table of per-caller buckets every worker takes from
  (snaplearn_common.security.ratelimit.SharedRateLimiter), so a caller whose connections land
  on different workers still gets one rate limit, not N;
- serves one /metrics: the sum of the workers' (snaplearn_common.metrics_merge), plus
  snaplearn_vision_workers and snaplearn_vision_worker_restarts_total;
- restarts a worker that dies once serving (a worker that fails before its first ready
  fails the start: a missing model would otherwise restart forever);
- on SIGTERM/SIGINT passes SIGTERM to every worker (each drains as a single server does)
  and waits for them.

Connections, not calls, are spread: a client with one connection talks to one worker.
Phones are many clients; a load generator should open several connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from snaplearn_common.files import write_ready_file
from snaplearn_common.metrics import MetricsEndpoint, serve_metrics
from snaplearn_common.metrics_merge import worker_metrics_registry
from snaplearn_common.ports import PortInUse
from snaplearn_common.security.ratelimit import SharedRateLimiter
from snaplearn_vision.config import VisionSettings
from snaplearn_vision.process.worker import SUPERVISOR_PID_ENV

log = logging.getLogger(__name__)

# A worker that dies this soon after its previous start waits before the next one, so that a
# crash on every request cannot turn into a tight restart loop.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
_STABLE_AFTER_S = 60.0
_READY_POLL_S = 0.05


def restart_backoff_s(quick_deaths: int) -> float:
    """Seconds to wait before restarting a worker that died `quick_deaths` times in a row
    soon after starting (0: it had been up for a while, restart at once)."""
    if quick_deaths <= 0:
        return 0.0
    return RESTART_BACKOFF_S[min(quick_deaths, len(RESTART_BACKOFF_S)) - 1]


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT that never listens: it holds the port
    (picking one when port is 0) while receiving no connections of its own."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
    except OSError as error:
        holder.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise
    return holder


def worker_spool_dir(spool_dir: Path | None, index: int) -> Path | None:
    """Worker 0 keeps the configured spool (and replays what a single process left there);
    the others get subfolders, which worker 0's spool does not read."""
    if spool_dir is None or index == 0:
        return spool_dir
    return spool_dir / f"worker-{index}"


@dataclass
class Worker:
    index: int
    ready_file: Path
    process: asyncio.subprocess.Process | None = None
    metrics_port: int | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    serving: bool = False


class WorkerSupervisor:
    """Starts, watches and stops `settings.workers` vision server processes on one port.

    argv: the command line the workers repeat (the supervisor's own); each worker's own
    flags are appended after it, and argparse keeps the last occurrence.
    """

    def __init__(self, settings: VisionSettings, argv: Sequence[str]) -> None:
        self.settings = settings
        self._argv = list(argv)
        self._run_dir: tempfile.TemporaryDirectory[str] | None = None  # the workers' ready files
        self._port_holder: socket.socket | None = None
        self._rate_limit_table: Path | None = None
        self.port = 0
        self.workers: list[Worker] = []
        self._keepers: list[asyncio.Task[None]] = []
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._stopping = False
        self._started = False
        self.registry = worker_metrics_registry("snaplearn_vision", self._worker_metrics_urls)
        self._live = Gauge(
            "snaplearn_vision_workers", "Worker processes serving now.", registry=self.registry
        )
        self.restarts = Counter(
            "snaplearn_vision_worker_restarts",
            "Worker processes restarted after dying while serving.",
            registry=self.registry,
        )

    @property
    def metrics_port(self) -> int:
        assert self._metrics_endpoint is not None, "supervisor not started"
        return self._metrics_endpoint.port

    def _worker_metrics_urls(self) -> list[str]:
        return [
            f"http://127.0.0.1:{w.metrics_port}/metrics" for w in self.workers if w.metrics_port is not None
        ]

    async def start(self) -> None:
        """Reserve the port, serve metrics, start every worker and wait until all serve.

        Raises RuntimeError if a worker exits before it serves (its own log says why)."""
        settings = self.settings
        self._port_holder = reserve_port(settings.host, settings.port)
        self.port = self._port_holder.getsockname()[1]
        self._run_dir = tempfile.TemporaryDirectory(prefix="snaplearn-vision-workers-")
        run_dir = Path(self._run_dir.name)
        if settings.security.rate_limit_per_s > 0:
            self._rate_limit_table = SharedRateLimiter.create(run_dir / "rate-limit.table")
        self._metrics_endpoint = serve_metrics(self.registry, settings.host, settings.metrics_port)
        self.workers = [Worker(i, run_dir / f"worker-{i}.json") for i in range(settings.workers)]
        loop = asyncio.get_running_loop()
        first_ready = [loop.create_future() for _ in self.workers]
        self._keepers = [
            asyncio.create_task(self._keep_running(worker, ready))
            for worker, ready in zip(self.workers, first_ready, strict=True)
        ]
        await asyncio.gather(*first_ready)
        self._started = True
        self.write_ready_file()
        log.info("%d workers serving on %s:%d", len(self.workers), settings.host, self.port)

    def worker_command(self, worker: Worker) -> list[str]:
        spool = worker_spool_dir(self.settings.spool_dir, worker.index)
        return [
            sys.executable, "-m", "snaplearn_vision.main", *self._argv,
            "--workers", "1",
            "--worker-index", str(worker.index),
            "--port", str(self.port),
            "--metrics-port", "0",
            "--ready-file", str(worker.ready_file),
            "--spool-dir", "" if spool is None else str(spool),
            *(["--rate-limit-table", str(self._rate_limit_table)] if self._rate_limit_table else []),
        ]  # fmt: skip

    async def _keep_running(self, worker: Worker, first_ready: asyncio.Future[None]) -> None:
        """Start the worker; once it has served, restart it whenever it dies (with backoff)."""
        await self._spawn(worker)
        try:
            await self._wait_ready(worker)
        except RuntimeError as exc:
            first_ready.set_exception(exc)
            return
        first_ready.set_result(None)
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            lived_s = time.monotonic() - worker.started_at
            if worker.serving:
                worker.serving = False
                worker.metrics_port = None
                self._live.dec()
                self.write_ready_file()
            worker.quick_deaths = 0 if lived_s > _STABLE_AFTER_S else worker.quick_deaths + 1
            backoff_s = restart_backoff_s(worker.quick_deaths)
            log.error(
                "worker %d (pid %d) exited with code %s after %.1f s; restarting in %.1f s",
                worker.index, worker.process.pid, code, lived_s, backoff_s,
            )  # fmt: skip
            await asyncio.sleep(backoff_s)
            if self._stopping:
                return
            await self._spawn(worker)
            self.restarts.inc()
            try:
                await self._wait_ready(worker)
            except RuntimeError as exc:
                log.error("%s", exc)  # the loop sees the exit and tries again, later
                continue
            self.write_ready_file()

    async def _spawn(self, worker: Worker) -> None:
        worker.ready_file.unlink(missing_ok=True)
        worker.started_at = time.monotonic()
        # Workers inherit stderr (their log lines carry "[worker i]"); stdout is the supervisor's.
        worker.process = await asyncio.create_subprocess_exec(
            *self.worker_command(worker),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())},
        )
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    async def _wait_ready(self, worker: Worker) -> None:
        """Until the worker's ready file appears; RuntimeError if the worker exits first."""
        assert worker.process is not None
        while not worker.ready_file.exists():
            if worker.process.returncode is not None:
                raise RuntimeError(
                    f"worker {worker.index} exited with code {worker.process.returncode} before serving"
                )
            await asyncio.sleep(_READY_POLL_S)
        ready = json.loads(worker.ready_file.read_text())
        worker.metrics_port = int(ready["metrics_port"])
        worker.serving = True
        self._live.inc()
        log.info("worker %d serving (pid %d)", worker.index, worker.process.pid)

    def write_ready_file(self) -> None:
        """The supervisor's ready file: host, port, metrics_port, pid and, per worker, its index,
        pid and private metrics port (rewritten when a worker restarts)."""
        if self.settings.ready_file is None or not self._started:
            return
        payload = {
            "host": self.settings.host,
            "port": self.port,
            "metrics_port": self.metrics_port,
            "pid": os.getpid(),
            "workers": [
                {"index": w.index, "pid": w.process.pid, "metrics_port": w.metrics_port}
                for w in self.workers
                if w.process is not None
            ],
        }
        write_ready_file(self.settings.ready_file, payload)

    async def stop(self) -> None:
        """SIGTERM every worker (each drains its calls), wait, then release the port."""
        self._stopping = True
        grace_s = self.settings.shutdown_grace_s + 10.0
        running = [w for w in self.workers if w.process is not None and w.process.returncode is None]
        for worker in running:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        for worker in running:
            assert worker.process is not None
            try:
                await asyncio.wait_for(worker.process.wait(), grace_s)
            except TimeoutError:
                log.error("worker %d did not stop within %.0f s: killing it", worker.index, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        for keeper in self._keepers:
            keeper.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        self._live.set(0)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None
        if self._port_holder is not None:
            self._port_holder.close()
            self._port_holder = None
        if self.settings.ready_file is not None and self._started:
            self.settings.ready_file.unlink(missing_ok=True)
        if self._run_dir is not None:
            self._run_dir.cleanup()
            self._run_dir = None


async def supervise(settings: VisionSettings, argv: Sequence[str]) -> int:
    """Run `settings.workers` workers until SIGTERM/SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    supervisor = WorkerSupervisor(settings, argv)
    exit_code = 0
    try:
        starting = asyncio.create_task(supervisor.start())
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop requested while the workers were starting")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return 0
        stopping.cancel()
        starting.result()  # re-raise a failed start
        line = (
            f"vision server ready on {settings.host}:{supervisor.port} "
            f"(metrics :{supervisor.metrics_port}, {settings.workers} workers)"
        )
        print(line, flush=True)
        log.info("%s", line)
        await stop_requested.wait()
        log.info("stop requested: draining the workers")
    except RuntimeError as exc:  # a worker failed to start; its own log lines say why
        log.error("%s", exc)
        exit_code = 1
    except PortInUse as exc:  # one sentence, no traceback
        print(f"snaplearn-vision: {exc}", file=sys.stderr)
        exit_code = 2
    except Exception:
        log.exception("vision server workers failed")
        exit_code = 1
    finally:
        await supervisor.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("vision server workers stopped")
    return exit_code
