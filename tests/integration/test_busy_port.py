"""A server started by hand on a port another process holds says so in one sentence naming
the port and exits 2: the real commands (`snaplearn-vision`, also with --workers 2, and
`snaplearn-recommender`) against a real listening socket, and the shared bootstrap for a port
taken while a server was starting."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snaplearn_common.ports import PortInUse
from snaplearn_common.server import start_grpc_server
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held by another listener (this test's socket, as another server would)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=90)


def assert_one_sentence(result: subprocess.CompletedProcess[str], command: str, port: int, flag: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"{command}: port {port} is already in use: another process is listening on 127.0.0.1:{port} "
        f"(stop it, or choose another port with {flag})"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_vision_server_on_a_busy_port(
    busy_port: int,
    trained_model_repository: Path,  # noqa: F811
    tmp_path: Path,
    workers: str,
) -> None:
    common = ["--model-repository", str(trained_model_repository), "--device", "cpu", "--workers", workers]
    common += ["--bus", "embedded", "--bus-path", str(tmp_path / "bus.db")]
    result = run("snaplearn_vision.main", "--port", str(busy_port), "--metrics-port", "0", *common)
    assert_one_sentence(result, "snaplearn-vision", busy_port, "--port")
    result = run("snaplearn_vision.main", "--port", "0", "--metrics-port", str(busy_port), *common)
    assert_one_sentence(result, "snaplearn-vision", busy_port, "--metrics-port")


def test_recommender_on_a_busy_port(busy_port: int, tmp_path: Path) -> None:
    common = ("--bus", "embedded", "--bus-path", str(tmp_path / "bus.db"), "--checkpoint-dir", "")
    result = run("snaplearn_recommender.main", "--port", str(busy_port), "--metrics-port", "0", *common)
    assert_one_sentence(result, "snaplearn-recommender", busy_port, "--port")
    result = run("snaplearn_recommender.main", "--port", "0", "--metrics-port", str(busy_port), *common)
    assert_one_sentence(result, "snaplearn-recommender", busy_port, "--metrics-port")


async def test_the_bootstrap_names_a_port_taken_while_starting(busy_port: int) -> None:
    with pytest.raises(PortInUse) as refused:
        await start_grpc_server([], [], port=busy_port)
    assert str(refused.value).startswith(f"port {busy_port} is already in use")
    # Joining siblings with SO_REUSEPORT is refused too when the holder did not offer to share.
    with pytest.raises(PortInUse):
        await start_grpc_server([], [], port=busy_port, reuse_port=True)
