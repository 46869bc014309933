"""The Go, Java and TypeScript example clients against the real servers, as app developers run them.

Each example is built from protos/snaplearn with its own toolchain (scripts/build_clients.sh:
go build, mvn package, npm ci + ts-proto + tsc; cached by input hash), then run as a separate
process against a vision server and a recommender started as for `make up` (ports 0, the small
trained test model, the embedded bus). Each classifies a worksheet photo, waits for the
recommender to learn from it, and prints its recommendations; the test checks the printed top
label and item titles against what the Python client gets from the same servers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snaplearn_client import RecommenderClient, VisionClient
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.certificates import CertificateAuthority
from tests.helpers.system import embedded_system
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
TOPIC = "fractions"  # the small test model recognises it reliably (tests/helpers/vision_model.py)
K = 5
# A cold machine downloads grpc-java, protoc, Go modules and npm packages; later runs are cached.
BUILD_TIMEOUT_S = 900
JAVA_JAR = REPO / "clients/java/target/snaplearn-client-example.jar"
RUN_TIMEOUT_S = 120

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 300)]

# The lines every example prints (the same format in each language).
CLASSIFIED = re.compile(
    r"^classified as (?P<label>\S+) \(score (?P<score>[0-9.]+), model (?P<model>\S+) v(?P<version>\S+)\)$"
)
HEADER = re.compile(
    r"^recommendations for (?P<user>\S+) \(snapshot (?P<snapshot>\S+), "
    r"(?P<applied>\d+) events applied, cold start (?P<cold>\w+)\):$"
)
ITEM = re.compile(r"^  (?P<rank>\d+)\. (?P<title>.+?) \[(?P<concepts>[^\]]*)\] (?P<reason>.*)$")


@dataclass(frozen=True)
class AppClient:
    language: str
    command: tuple[str, ...]  # runs the built example; target/image/user flags are appended


def _app_clients() -> dict[str, AppClient]:
    java = shutil.which("java") or "java"
    node = shutil.which("node") or "node"
    return {
        "go": AppClient("go", (str(REPO / "clients/go/bin/snaplearn-example"),)),
        "java": AppClient("java", (java, "-jar", str(JAVA_JAR))),
        "typescript": AppClient("typescript", (node, str(REPO / "clients/typescript/dist/example.js"))),
    }


@pytest.fixture(scope="module")
def built_clients() -> dict[str, AppClient]:
    built = subprocess.run(
        ["bash", str(REPO / "scripts/build_clients.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert built.returncode == 0, f"building the example clients failed:\n{built.stdout}\n{built.stderr}"
    return _app_clients()


@pytest.fixture(scope="module")
def system(
    tmp_path_factory: pytest.TempPathFactory,
    trained_model_repository: Path,  # noqa: F811
) -> Iterator[tuple[str, str]]:
    with embedded_system(tmp_path_factory.mktemp("app-clients") / "var", trained_model_repository) as running:
        yield running.vision_target, running.recommender_target


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "worksheet.jpg"
    path.write_bytes(sample_image_bytes(TOPIC, seed=1))
    return path


@dataclass(frozen=True)
class Reference:
    label: str
    score: float


@pytest.fixture(scope="module")
def reference(system: tuple[str, str], photo: Path) -> Reference:
    """The Python client's answer for the same photo, taken before any example runs.

    It waits until the recommender has applied this classification too, so that afterwards the
    only events are the examples' own: an example's recommendations then stay those of the
    snapshot it printed until the next example runs.
    """
    vision_target, recommender_target = system
    with VisionClient(vision_target, timeout_s=30) as vision:
        top = vision.classify(photo.read_bytes(), "python-reference", top_k=1).labels[0]
    with RecommenderClient(recommender_target) as recommender:
        deadline = time.monotonic() + 60
        while recommender.recommend("python-reference", k=1).cold_start:
            assert time.monotonic() < deadline, "recommender did not apply the reference event within 60 s"
            time.sleep(0.05)
    return Reference(top.label, top.score)


@pytest.mark.parametrize("language", ["go", "java", "typescript"])
def test_example_classifies_then_recommends(
    language: str,
    built_clients: dict[str, AppClient],
    system: tuple[str, str],
    photo: Path,
    reference: Reference,
) -> None:
    vision_target, recommender_target = system
    user = f"{language}-app-student"
    client = built_clients[language]
    flags = ["-vision", vision_target, "-recommender", recommender_target, "-image", str(photo)]
    flags += ["-user", user, "-k", str(K)]
    if language == "typescript":  # node's parseArgs wants GNU-style long options
        flags = ["-" + flag if flag.startswith("-") else flag for flag in flags]
    ran = subprocess.run([*client.command, *flags], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert ran.returncode == 0, f"{language} example failed:\n{ran.stdout}\n{ran.stderr}"
    lines = ran.stdout.splitlines()

    classified = CLASSIFIED.match(lines[0])
    assert classified, f"unexpected first line from the {language} example: {lines[0]!r}"
    assert classified["label"] == TOPIC
    assert classified["model"] == "worksheet-topics"
    assert classified["label"] == reference.label
    assert float(classified["score"]) == pytest.approx(reference.score, abs=1e-3)

    header = HEADER.match(lines[1])
    assert header, f"unexpected second line from the {language} example: {lines[1]!r}"
    assert header["user"] == user
    assert header["cold"] == "false"
    items = [ITEM.match(line) for line in lines[2:]]
    assert all(items) and len(items) == K, ran.stdout
    # No event arrives between the example's last Recommend and this one (see `reference`), so
    # the Python client must read the same snapshot and get the same items in the same order.
    with RecommenderClient(recommender_target) as recommender:
        expected = recommender.recommend(user, k=K)
    assert not expected.cold_start
    assert [m["title"] for m in items if m] == [item.title for item in expected.items]
    assert any(TOPIC in m["concepts"].split(", ") for m in items if m)
    assert any(TOPIC in m["reason"] for m in items if m)


# -- TLS and a bearer token ---------------------------------------------------------------------

SCHOOL_TOKEN = "example-app-token-school-a"


@dataclass(frozen=True)
class SecureSystem:
    vision_target: str
    recommender_target: str
    ca_file: Path


@pytest.fixture(scope="module")
def secure_system(
    tmp_path_factory: pytest.TempPathFactory,
    trained_model_repository: Path,  # noqa: F811
) -> Iterator[SecureSystem]:
    """Both servers with TLS and tokens: a certificate made here, and a static token that may act
    for school-a's students only (the servers read the same SNAPLEARN_* variables as in a pod)."""
    secrets = tmp_path_factory.mktemp("secrets")
    ca = CertificateAuthority()
    (secrets / "ca.crt").write_bytes(ca.cert_pem)
    ca.issue("localhost", server=True).write(secrets / "tls.crt", secrets / "tls.key")
    tokens = {
        SCHOOL_TOKEN: {
            "subject": "school-a-app",
            "scopes": ["classify", "recommend", "feedback"],
            "tenants": ["school-a"],
        }
    }
    (secrets / "tokens.json").write_text(json.dumps(tokens))
    environment = {
        "SNAPLEARN_TLS_CERT": str(secrets / "tls.crt"),
        "SNAPLEARN_TLS_KEY": str(secrets / "tls.key"),
        "SNAPLEARN_AUTH_TOKENS_FILE": str(secrets / "tokens.json"),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        running = embedded_system(
            tmp_path_factory.mktemp("secure-app-clients") / "var", trained_model_repository
        )
        system = running.__enter__()
    try:
        yield SecureSystem(system.vision_target, system.recommender_target, secrets / "ca.crt")
    finally:
        running.__exit__(None, None, None)


def _run_example(
    language: str, client: AppClient, flags: list[str], token: str | None
) -> subprocess.CompletedProcess[str]:
    if language == "typescript":  # node's parseArgs wants GNU-style long options
        flags = ["-" + flag if flag.startswith("-") else flag for flag in flags]
    environment = {k: v for k, v in os.environ.items() if k != "SNAPLEARN_TOKEN"}
    if token is not None:
        environment["SNAPLEARN_TOKEN"] = token
    return subprocess.run(
        [*client.command, *flags], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=environment
    )


def _status_words(ran: subprocess.CompletedProcess[str]) -> str:
    """The output with status names spelt one way (Go: PermissionDenied, Java: PERMISSION_DENIED)."""
    return (ran.stdout + ran.stderr).upper().replace("_", "")


@pytest.mark.parametrize("language", ["go", "java", "typescript"])
def test_example_speaks_tls_with_a_token(
    language: str, built_clients: dict[str, AppClient], secure_system: SecureSystem, photo: Path
) -> None:
    user = f"school-a/{language}-tls-student"
    client = built_clients[language]
    flags = ["-vision", secure_system.vision_target, "-recommender", secure_system.recommender_target]
    # The certificate names localhost; the targets are addresses.
    flags += ["-tls-ca", str(secure_system.ca_file), "-server-name", "localhost"]
    flags += ["-image", str(photo), "-k", str(K)]

    ran = _run_example(language, client, [*flags, "-user", user], SCHOOL_TOKEN)
    assert ran.returncode == 0, f"{language} example failed over TLS:\n{ran.stdout}\n{ran.stderr}"
    lines = ran.stdout.splitlines()
    classified = CLASSIFIED.match(lines[0])
    assert classified and classified["label"] == TOPIC, ran.stdout
    header = HEADER.match(lines[1])
    assert header and header["user"] == user and header["cold"] == "false", ran.stdout
    assert len(lines[2:]) == K and all(ITEM.match(line) for line in lines[2:]), ran.stdout

    # The servers refuse what the token does not allow, and the examples say so.
    refused = _run_example(language, client, [*flags, "-user", user], None)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in _status_words(refused), refused
    foreign = _run_example(language, client, [*flags, "-user", f"school-b/{language}-student"], SCHOOL_TOKEN)
    assert foreign.returncode != 0 and "PERMISSIONDENIED" in _status_words(foreign), foreign
    # Plaintext against a TLS port: no answer at all.
    plaintext = [
        f for f in flags if f not in ("-tls-ca", str(secure_system.ca_file), "-server-name", "localhost")
    ]
    insecure = _run_example(language, client, [*plaintext, "-user", user], SCHOOL_TOKEN)
    assert insecure.returncode != 0, insecure
