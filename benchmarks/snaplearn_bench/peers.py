"""The peers of the vision comparison as the harness runs them (Ray Serve, LitServe, NVIDIA Triton
through PyTriton, each in its own process: `peer_servers`), and perf_analyzer, Triton's own load
generator, against our OIP endpoint. What they need beyond the bench extra is installed here,
under var/bench-tools, on first use."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from snaplearn_bench.load import load, photos
from snaplearn_bench.ours import Settings
from snaplearn_bench.paths import PY, REPO, TOOLS_DIR, log
from snaplearn_bench.processes import free_port, process, torch_env
from snaplearn_common.metrics import scrape

PEERS = ("ray", "litserve", "triton")
TRITON_VENV = TOOLS_DIR / "triton-venv"
PYTRITON = "nvidia-pytriton==0.7.0"


def ensure_perf_analyzer() -> tuple[Path | None, dict[str, str], str]:
    """(binary, extra environment, note). perf-analyzer on PyPI is a placeholder (0.1.0) for
    this platform; the tritonclient 2.41 manylinux wheel still ships the binary, which links
    libb64 (Debian) and libcudart 12 (PyPI) though it never touches a GPU here."""
    binary = TOOLS_DIR / "tritonclient-2.41.0.data" / "data" / "bin" / "perf_analyzer"
    libs = [TOOLS_DIR / "usr" / "lib" / "x86_64-linux-gnu", TOOLS_DIR / "nvidia" / "cuda_runtime" / "lib"]
    env = {"LD_LIBRARY_PATH": ":".join(str(p) for p in libs)}
    if binary.exists():
        return binary, env, "perf_analyzer from the tritonclient 2.41.0 wheel"
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for requirement in ("tritonclient==2.41.0", "nvidia-cuda-runtime-cu12==12.9.79"):
                download = [PY, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
                subprocess.run([*download, "-d", tmp, requirement], check=True)
            subprocess.run(["apt-get", "download", "libb64-0d"], cwd=tmp, check=True, capture_output=True)
            for wheel in Path(tmp).glob("*.whl"):
                subprocess.run(["unzip", "-q", "-o", str(wheel), "-d", str(TOOLS_DIR)], check=True)
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(TOOLS_DIR)], check=True)
        binary.chmod(0o755)
        probe = subprocess.run(
            [str(binary), "--version"], env={**os.environ, **env}, capture_output=True, text=True
        )
        if "error while loading shared libraries" in probe.stderr:
            return None, env, f"perf_analyzer does not start: {probe.stderr.strip()[:200]}"
        return binary, env, "perf_analyzer from the tritonclient 2.41.0 wheel"
    except (subprocess.CalledProcessError, OSError) as error:
        return None, env, f"perf_analyzer unavailable: {error}"


def ensure_triton() -> tuple[Path | None, dict[str, str], str]:
    """(python, extra environment, note) for running NVIDIA Triton through PyTriton.

    PyTriton pins numpy<2, so it gets a venv of its own (var/bench-tools/triton-venv) that also
    sees this environment's packages (torch, our engine) behind its own, through a .pth file.
    Its Python-backend stub is built per Python minor version and links libpython3.X.so
    dynamically: LD_LIBRARY_PATH puts this interpreter's own libpython first, or the stub may
    load the system's older 3.11 library under this interpreter's newer standard library and
    fail (DECISIONS D23).
    """
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {"LD_LIBRARY_PATH": ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    python = TRITON_VENV / "bin" / "python"
    probe = [str(python), "-c", "import pytriton.triton, torch, snaplearn_vision"]
    try:
        if not python.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
            log(f"installing {PYTRITON} into {TRITON_VENV}")
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", "--clear", str(TRITON_VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", PYTRITON], check=True)
            site_dir = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            ours = sysconfig.get_paths()["purelib"]
            # Processed after the venv's own site-packages: its numpy<2 wins, torch comes from ours.
            Path(site_dir, "zz_snaplearn.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
        check = subprocess.run(probe, capture_output=True, text=True)
        if check.returncode != 0:
            return None, env, f"NVIDIA Triton (PyTriton) unavailable: {check.stderr.strip()[-300:]}"
    except (subprocess.CalledProcessError, OSError) as error:
        return None, env, f"NVIDIA Triton (PyTriton) unavailable: {error}"
    return python, env, f"NVIDIA Triton from {PYTRITON} (its own venv, {TRITON_VENV.relative_to(REPO)})"


def bench_peer(
    peer: str,
    root: Path,
    model: str,
    settings: Settings,
    max_batch_size: int,
    rates: tuple[float, float],
    *,
    timeout_s: float = 5.0,
    warmup_s: float | None = None,
) -> dict[str, Any]:
    """One peer: capacity (closed loop), then open loops at our rates (half, overload; a rate
    <= 0 skips its phase). `timeout_s` per call; `warmup_s` the generator's (None: its own)."""
    port = free_port()
    python = settings.triton_python if peer == "triton" else PY
    argv = [
        str(python), "-m", "snaplearn_bench.peer_servers", peer,
        "--repository", str(root),
        "--model", model,
        "--port", str(port),
        "--torch-threads", str(settings.torch_threads),
        "--max-batch-size", str(max_batch_size),
        "--wait-s", str(settings.max_queue_delay_ms / 1000),
    ]  # fmt: skip
    env = torch_env(settings.torch_threads)
    metrics_port = 0  # Triton's, scraped for its batch sizes
    if peer == "ray":
        target, protocol = f"127.0.0.1:{port}", "grpc"
        # A port of its own: port + 1 may be a client's ephemeral port (the generator's last run).
        argv += ["--http-port", str(free_port())]
    elif peer == "triton":
        target, protocol = f"127.0.0.1:{port}", "oip"
        env.update(settings.triton_env)
        metrics_port = free_port()
        argv += ["--http-port", str(free_port()), "--metrics-port", str(metrics_port)]
    else:
        target, protocol = f"http://127.0.0.1:{port}/predict", "http"
    with process(argv, env, "ready", timeout_s=300):
        result: dict[str, Any] = {}
        common: dict[str, Any] = {"connections": settings.connections, "model": model, "timeout_s": timeout_s}
        if warmup_s is not None:
            common["warmup_s"] = warmup_s
        before = scrape(metrics_port) if peer == "triton" else {}
        result["closed"] = load(
            target, protocol, "closed", settings.seconds, concurrency=settings.concurrency, **common
        )
        if peer == "triton":  # the protocol's answers do not say; Triton's metrics do
            result["closed"]["mean_batch_size_seen"] = triton_mean_batch(before, scrape(metrics_port))
        for phase, rate in (("half", rates[0]), ("overload", rates[1])):
            if rate > 0:
                result[phase] = load(target, protocol, "open", settings.seconds, rate=rate, **common)
    return result


def triton_mean_batch(before: dict[str, float], after: dict[str, float]) -> float:
    """Requests per model execution between two scrapes of Triton's metrics (its mean batch)."""

    def delta(name: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(name + "{"))

    executions = delta("nv_inference_exec_count")
    return delta("nv_inference_count") / executions if executions else float("nan")


def run_perf_analyzer(settings: Settings, model: str, target: str) -> dict[str, Any]:
    """perf_analyzer's closed loop at our concurrency against our OIP endpoint at `target`."""
    assert settings.perf_analyzer is not None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images.json"
        # b64 is the tensor's raw content; for BYTES that is each element's 4-byte length + bytes.
        entries = [
            {"IMAGE": {"b64": base64.b64encode(struct.pack("<I", len(photo)) + photo).decode(), "shape": [1]}}
            for photo in photos(16)
        ]
        data.write_text(json.dumps({"data": entries}))
        csv = Path(tmp) / "out.csv"
        argv = [
            str(settings.perf_analyzer),
            "-m", model,
            "-u", target,
            "-i", "grpc",
            "--input-data", str(data),
            "--concurrency-range", str(settings.concurrency),
            "--measurement-interval", str(int(settings.seconds * 1000)),
            "--stability-percentage", "30",  # this machine is shared: the default 10% rarely settles
            "--max-trials", "4",
            "-f", str(csv),
        ]  # fmt: skip
        out = subprocess.run(
            argv, env={**os.environ, **settings.perf_env}, capture_output=True, text=True, timeout=600
        )
        if out.returncode != 0 or not csv.exists():
            return {"error": (out.stdout + out.stderr).strip()[-800:]}
        header, row = csv.read_text().splitlines()[:2]
        values = dict(zip(header.split(","), row.split(","), strict=False))
        return {
            "throughput": float(values["Inferences/Second"]),
            "p50_ms": float(values["p50 latency"]) / 1000,
            "p99_ms": float(values["p99 latency"]) / 1000,
        }
