"""The distributions' declared requirements: an app developer who installs snaplearn-client gets
grpcio and protobuf, never torch, torchvision, LightFM, scipy or numpy.

The wheels are built here from this checkout (no network: `pip wheel --no-deps
--no-build-isolation`), their Requires-Dist read, and the requirements followed to the bottom:
ours through the wheels built here, third-party ones through the metadata of what this venv has
installed (the same pins).
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
# distribution name -> its folder
OURS = {
    "snaplearn-api": REPO / "protos",
    "snaplearn-client": REPO / "clients" / "python",
    "snaplearn-common": REPO / "services",
    "snaplearn-vision": REPO / "vision_server",
    "snaplearn-recommender": REPO / "recommender_worker",
}
HEAVY = {"torch", "torchvision", "lightfm", "lightfm-next", "scipy", "numpy"}


@pytest.fixture(scope="module")
def wheel_requirements(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Requirement]]:
    out = tmp_path_factory.mktemp("wheels")
    # Built from copies: an in-tree build would leave build/ and *.egg-info in the checkout.
    sources = tmp_path_factory.mktemp("sources")
    for name, folder in OURS.items():
        ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "bin", "node_modules")
        shutil.copytree(folder, sources / name, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), *(str(sources / name) for name in OURS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    requirements: dict[str, list[Requirement]] = {}
    for wheel in out.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            message = email.parser.Parser().parsestr(archive.read(name).decode())
        requires = [Requirement(r) for r in message.get_all("Requires-Dist") or []]
        requirements[canonicalize_name(message["Name"])] = [r for r in requires if r.marker is None]
    assert set(requirements) == set(OURS), f"built {sorted(requirements)}"
    return requirements


def closure(root: str, ours: dict[str, list[Requirement]]) -> set[str]:
    """Every distribution `root` pulls in (without extras), ours and third-party."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        if name in ours:
            todo += [r.name for r in ours[name]]
            continue
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen - {root}


def test_the_client_pulls_in_grpcio_and_protobuf_and_nothing_heavy(wheel_requirements) -> None:
    pulled = closure("snaplearn-client", wheel_requirements)
    assert {"snaplearn-api", "grpcio", "protobuf"} <= pulled
    assert not pulled & HEAVY, f"snaplearn-client pulls in {sorted(pulled & HEAVY)}"
    assert not pulled & {"snaplearn-common", "snaplearn-vision", "snaplearn-recommender"}


def test_common_pulls_in_no_ml_framework(wheel_requirements) -> None:
    pulled = closure("snaplearn-common", wheel_requirements)
    assert "pydantic-settings" in pulled
    assert not pulled & {"torch", "torchvision", "lightfm", "lightfm-next", "scipy"}


def test_each_server_pulls_in_its_own_framework_only(wheel_requirements) -> None:
    vision = closure("snaplearn-vision", wheel_requirements)
    recommender = closure("snaplearn-recommender", wheel_requirements)
    assert {"torch", "torchvision", "snaplearn-common"} <= vision
    assert not vision & {"lightfm", "lightfm-next", "snaplearn-recommender"}
    assert {"lightfm-next", "scipy", "snaplearn-common"} <= recommender
    assert not recommender & {"torch", "torchvision", "snaplearn-vision"}
