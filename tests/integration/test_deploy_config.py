"""The deployment files configure the servers the way they say they do.

The servers are configured only by environment variables (SNAPLEARN_VISION_<FLAG>,
SNAPLEARN_RECOMMENDER_<FLAG>, SNAPLEARN_BUS*, SNAPLEARN_KAFKA_*). A misspelt variable is
silently ignored by a server, and no schema catches it, so these tests take the environment each
container really gets (image ENV + Compose `environment`, or the kustomize-rendered Deployment
with its ConfigMap), build the server's settings from it with the server's own parser, and
require every SNAPLEARN_* variable to be one its settings declare and the key settings to come
out as intended. Also: the protos' breaking-change check has teeth.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from snaplearn_recommender import config as recommender_config
from snaplearn_vision import config as vision_config

REPO = Path(__file__).resolve().parents[2]
VISION_SERVICE = "snaplearn.vision.v1.VisionService"
RECOMMENDER_SERVICE = "snaplearn.recommender.v1.RecommenderService"


@pytest.fixture(scope="module")
def tools_bin() -> Path:
    """scripts/deploy_tools.sh: kustomize, buf, ... (installed once, cached; fails loudly if it cannot)."""
    installed = subprocess.run(
        ["bash", str(REPO / "scripts/deploy_tools.sh")], capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, f"installing the deploy tools failed:\n{installed.stderr}"
    return Path(installed.stdout.strip())


def settings_under(
    environment: Mapping[str, str], build: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, set[str]]:
    """The settings `build` (a server's own parser) makes from `environment` alone, and the
    environment variables its settings class declares."""
    with monkeypatch.context() as patch:
        patch.setattr(os, "environ", dict(environment))
        settings = build([])
    return settings, set(type(settings).env_names())


def assert_all_read(environment: Mapping[str, str], declared: set[str], server: str, where: str) -> None:
    """Every SnapLearn variable the container gets (image ENV and its own) is one the server reads.

    Each server has its own image, so nothing in it is meant for the other server.
    """
    ignored = sorted(name for name in environment if name.startswith("SNAPLEARN_") and name not in declared)
    assert not ignored, f"{where} sets variables the {server} server never reads: {ignored}"


# -- Docker ------------------------------------------------------------------------------------


def image_environment(dockerfile: Path) -> dict[str, str]:
    """The ENV of the Dockerfile's last stage (the runtime image)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    runtime = text.rsplit("\nFROM ", 1)[1]
    environment: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            environment.update(re.findall(r"(\w+)=(\S+)", line))
    return environment


@pytest.mark.parametrize(
    ("dockerfile", "distributions"),
    [
        ("Dockerfile", ("protos", "services", "vision_server")),
        ("Dockerfile.cuda", ("protos", "services", "vision_server")),
        ("Dockerfile.recommender", ("protos", "services", "recommender_worker")),
    ],
)
def test_each_image_installs_only_its_servers_distribution(
    dockerfile: str, distributions: tuple[str, ...]
) -> None:
    text = (REPO / "docker" / dockerfile).read_text().replace("\\\n", " ")
    (requirements,) = re.findall(r"python requirements\.py ([\w ]+?) >", text)
    assert tuple(requirements.split()) == distributions
    (installed,) = re.findall(r"pip install --no-deps ([\w./ ]+?) (?:&&|$)", text, flags=re.MULTILINE)
    assert tuple(p.removeprefix("./") for p in installed.split()) == distributions
    copied = {
        next(word for word in line.split()[1:] if not word.startswith("--")).split("/")[0]
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    assert copied <= {*distributions, "docker"}, f"{dockerfile} copies {sorted(copied)}"
    ignore = (REPO / "docker" / f"{dockerfile}.dockerignore").read_text()
    other = {"vision_server", "recommender_worker", "clients", "benchmarks"} - set(distributions)
    assert not [
        line for line in ignore.splitlines() if line.startswith("!") and line[1:].split("/")[0] in other
    ]


def compose_services() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker/docker-compose.yml").read_text())["services"]


def compose_environment(service: str, dockerfile: str) -> dict[str, str]:
    environment = image_environment(REPO / "docker" / dockerfile)
    environment.update({k: str(v) for k, v in compose_services()[service]["environment"].items()})
    return environment


@pytest.mark.parametrize(
    ("service", "dockerfile", "device"),
    [("vision", "Dockerfile", "cpu"), ("vision-gpu", "Dockerfile.cuda", "cuda")],
)
def test_compose_vision_environment(
    service: str, dockerfile: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = compose_environment(service, dockerfile)
    settings, read = settings_under(environment, vision_config.settings_from_args, monkeypatch)
    assert_all_read(environment, read, "vision", f"compose service {service}")
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50051, 9101)
    assert settings.model_repository == Path("/models")
    assert settings.device == device
    assert settings.bus.backend == "kafka"
    assert settings.bus.kafka_bootstrap_servers == "kafka:29092"
    # The probe checks the service the server registers in grpc.health.v1.
    assert VISION_SERVICE in compose_services()[service]["healthcheck"]["test"]


def test_compose_recommender_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = compose_environment("recommender", "Dockerfile.recommender")
    settings, read = settings_under(environment, recommender_config.settings_from_args, monkeypatch)
    assert_all_read(environment, read, "recommender", "compose service recommender")
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50052, 9102)
    assert settings.checkpoint_dir == Path("/var/lib/snaplearn/recommender")
    assert settings.bus.backend == "kafka"
    assert settings.bus.kafka_bootstrap_servers == "kafka:29092"
    assert RECOMMENDER_SERVICE in compose_services()["recommender"]["healthcheck"]["test"]


def test_compose_recommender_query_replica_reads_the_trainers_snapshots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer_env = compose_environment("recommender", "Dockerfile.recommender")
    trainer, _ = settings_under(trainer_env, recommender_config.settings_from_args, monkeypatch)
    environment = compose_environment("recommender-query", "Dockerfile.recommender")
    settings, read = settings_under(environment, recommender_config.settings_from_args, monkeypatch)
    assert_all_read(environment, read, "recommender", "compose service recommender-query")
    assert (trainer.role, settings.role) == ("trainer", "query")
    assert settings.snapshot_dir == trainer.snapshot_dir and settings.snapshot_dir
    # The replica mounts the volume the trainer writes its snapshots into, read-only.
    services = compose_services()
    trainer_volume = next(v for v in services["recommender"]["volumes"] if v.startswith("recommender-state:"))
    volume, mount = trainer_volume.split(":")[:2]
    assert Path(settings.snapshot_dir).is_relative_to(mount)
    assert f"{volume}:{mount}:ro" in services["recommender-query"]["volumes"]
    assert RECOMMENDER_SERVICE in services["recommender-query"]["healthcheck"]["test"]


@pytest.mark.parametrize(
    ("service", "dockerfile", "build", "health_service"),
    [
        ("vision", "Dockerfile", vision_config.settings_from_args, VISION_SERVICE),
        ("vision-gpu", "Dockerfile.cuda", vision_config.settings_from_args, VISION_SERVICE),
        ("recommender", "Dockerfile.recommender", recommender_config.settings_from_args, RECOMMENDER_SERVICE),
        (
            "recommender-query",
            "Dockerfile.recommender",
            recommender_config.settings_from_args,
            RECOMMENDER_SERVICE,
        ),
    ],
)
def test_compose_secure_override_serves_tls_and_tokens_from_secrets(
    service: str, dockerfile: str, build: Any, health_service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secure = yaml.safe_load((REPO / "docker/docker-compose.secure.yml").read_text())
    override = secure["services"][service]
    environment = compose_environment(service, dockerfile)
    environment.update({k: str(v) for k, v in override["environment"].items()})  # Compose merges maps
    settings, read = settings_under(environment, build, monkeypatch)
    assert_all_read(environment, read, service, f"docker-compose.secure.yml service {service}")
    assert settings.bus.backend == "kafka"
    # Each file the server reads is a secret Compose mounts under /run/secrets.
    mounted = {Path("/run/secrets") / name for name in override["secrets"]}
    assert set(secure["secrets"]) == set(override["secrets"])
    security = settings.security
    assert {security.tls_cert, security.tls_key, security.auth_jwt_keys} <= mounted
    assert security.reflection is False
    probe = override["healthcheck"]["test"]
    assert Path(probe[probe.index("--tls-ca") + 1]) in mounted
    assert probe[-2:] == [f"127.0.0.1:{settings.port}", health_service]


def test_compose_reuses_the_kafka_compose_file() -> None:
    compose = yaml.safe_load((REPO / "docker/docker-compose.yml").read_text())
    assert compose["include"] == ["kafka-compose.yml"]
    kafka = yaml.safe_load((REPO / "docker/kafka-compose.yml").read_text())["services"]["kafka"]
    assert "PLAINTEXT://kafka:29092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]


# -- Kubernetes --------------------------------------------------------------------------------


def render(tools_bin: Path, kustomization: str) -> list[dict[str, Any]]:
    rendered = subprocess.run(
        [str(tools_bin / "kustomize"), "build", str(REPO / kustomization)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def container_environment(
    objects: list[dict[str, Any]], container: dict[str, Any], image_env: dict[str, str]
) -> dict[str, str]:
    environment = dict(image_env)
    for source in container.get("envFrom", []):
        config_map = find(objects, "ConfigMap", source["configMapRef"]["name"])
        environment.update(config_map["data"])
    environment.update({e["name"]: e["value"] for e in container.get("env", [])})
    return environment


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from workload["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize(
    ("overlay", "dockerfile", "device"), [("cpu", "Dockerfile", "cpu"), ("gpu", "Dockerfile.cuda", "cuda")]
)
def test_kubernetes_vision_deployment(
    overlay: str, dockerfile: str, device: str, tools_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(tools_bin, f"deploy/overlays/{overlay}")
    deployment = find(objects, "Deployment", "vision")
    (container,) = containers(deployment)
    environment = container_environment(objects, container, image_environment(REPO / "docker" / dockerfile))
    settings, read = settings_under(environment, vision_config.settings_from_args, monkeypatch)
    assert_all_read(environment, read, "vision", f"overlay {overlay}, Deployment vision")
    assert settings.device == device
    assert settings.bus.backend == "kafka"
    assert settings.host == "0.0.0.0"

    # Probes hit the port the server binds, and readiness asks for the service it registers.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    assert container["readinessProbe"]["grpc"] == {"port": settings.port, "service": VISION_SERVICE}
    assert container["startupProbe"]["grpc"]["port"] == settings.port
    assert container["livenessProbe"]["grpc"]["port"] == settings.port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    # The pod outlives its drain: preStop, then SIGTERM and the server's own grace period.
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 5 + settings.shutdown_grace_s
    models = {"name": "models", "mountPath": str(settings.model_repository), "readOnly": True}
    assert models in container["volumeMounts"]
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == "1") == (overlay == "gpu")


def test_kubernetes_recommender_trainer(tools_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(tools_bin, "deploy/overlays/cpu")
    trainer = find(objects, "StatefulSet", "recommender")
    assert trainer["spec"]["replicas"] == 1  # the single writer of its model
    (container,) = containers(trainer)
    image_env = image_environment(REPO / "docker/Dockerfile.recommender")
    environment = container_environment(objects, container, image_env)
    settings, read = settings_under(environment, recommender_config.settings_from_args, monkeypatch)
    assert_all_read(environment, read, "recommender", "StatefulSet recommender")
    assert settings.bus.backend == "kafka"
    assert container["readinessProbe"]["grpc"] == {"port": settings.port, "service": RECOMMENDER_SERVICE}
    # Checkpoints land on the claim, not in the container's filesystem.
    (claim,) = trainer["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert settings.checkpoint_dir is not None
    assert settings.checkpoint_dir.is_relative_to(mount["mountPath"])


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_recommender_query_replicas_follow_the_trainers_snapshots(
    overlay: str, tools_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(tools_bin, f"deploy/overlays/{overlay}")
    image_env = image_environment(REPO / "docker/Dockerfile.recommender")
    trainer = find(objects, "StatefulSet", "recommender")
    (trainer_container,) = containers(trainer)
    trainer_env = container_environment(objects, trainer_container, image_env)
    trainer_settings, read = settings_under(trainer_env, recommender_config.settings_from_args, monkeypatch)
    assert_all_read(trainer_env, read, "recommender", "StatefulSet recommender")
    assert trainer_settings.role == "trainer" and trainer_settings.snapshot_dir

    query = find(objects, "Deployment", "recommender-query")
    (container,) = containers(query)
    environment = container_environment(objects, container, image_env)
    settings, read = settings_under(environment, recommender_config.settings_from_args, monkeypatch)
    assert_all_read(environment, read, "recommender", "Deployment recommender-query")
    assert settings.role == "query"
    assert settings.snapshot_dir == trainer_settings.snapshot_dir  # the same store, both sides
    assert settings.bus.backend == "kafka"  # RecordFeedback publishes from the replicas
    assert container["readinessProbe"]["grpc"] == {"port": settings.port, "service": RECOMMENDER_SERVICE}
    assert container["livenessProbe"]["grpc"] == {"port": settings.port}  # "": live while waiting

    # One ReadWriteMany claim: mounted read-write by the trainer, read-only by the replicas, at the
    # snapshot directory both are configured with.
    claim = find(objects, "PersistentVolumeClaim", "recommender-snapshots")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    def mount_of(workload: dict[str, Any], workload_container: dict[str, Any]) -> dict[str, Any]:
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        (volume,) = [
            v
            for v in volumes
            if v.get("persistentVolumeClaim", {}).get("claimName") == "recommender-snapshots"
        ]
        (mount,) = [m for m in workload_container["volumeMounts"] if m["name"] == volume["name"]]
        return mount

    trainer_mount, query_mount = mount_of(trainer, trainer_container), mount_of(query, container)
    assert trainer_mount["mountPath"] == query_mount["mountPath"] == settings.snapshot_dir
    assert not trainer_mount.get("readOnly") and query_mount["readOnly"] is True

    autoscaler = find(objects, "HorizontalPodAutoscaler", "recommender-query")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "recommender-query"
    service = find(objects, "Service", "recommender-query")
    assert service["spec"]["selector"].items() <= query["spec"]["template"]["metadata"]["labels"].items()


def test_autoscalers_use_metrics_the_adapter_serves(tools_bin: Path) -> None:
    adapter = yaml.safe_load((REPO / "deploy/monitoring/prometheus-adapter/config.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    objects = render(tools_bin, "deploy/overlays/cpu")
    autoscalers = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert {a["metadata"]["name"] for a in autoscalers} == {"vision", "recommender-query"}
    for autoscaler in autoscalers:
        names = {m["pods"]["metric"]["name"] for m in autoscaler["spec"]["metrics"] if m["type"] == "Pods"}
        assert names, f"{autoscaler['metadata']['name']} has no pods metric"
        assert names <= served, f"{autoscaler['metadata']['name']} scales on {names - served}, not served"
        target = autoscaler["spec"]["scaleTargetRef"]
        assert find(objects, target["kind"], target["name"])


@pytest.mark.parametrize(
    ("kind", "name", "server", "service"),
    [
        ("Deployment", "vision", "vision", VISION_SERVICE),
        ("StatefulSet", "recommender", "recommender", RECOMMENDER_SERVICE),
        ("Deployment", "recommender-query", "recommender", RECOMMENDER_SERVICE),
    ],
)
def test_kubernetes_secure_overlay_serves_tls_and_tokens_from_secrets(
    kind: str, name: str, server: str, service: str, tools_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(tools_bin, "deploy/overlays/cpu-secure")
    workload = find(objects, kind, name)
    (container,) = containers(workload)
    dockerfile, build = {
        "vision": ("Dockerfile", vision_config.settings_from_args),
        "recommender": ("Dockerfile.recommender", recommender_config.settings_from_args),
    }[server]
    environment = container_environment(objects, container, image_environment(REPO / "docker" / dockerfile))
    settings, read = settings_under(environment, build, monkeypatch)
    assert_all_read(environment, read, server, f"overlay cpu-secure, {kind} {name}")
    assert settings.bus.backend == "kafka"  # the base's settings survive the patch

    # The certificate, its CA and the token keys come from the Secrets, mounted read-only.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secrets = {
        v["name"]: v["secret"]["secretName"]
        for v in workload["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert secrets == {"tls": "snaplearn-tls", "auth-keys": "snaplearn-auth-keys"}
    tls_dir, keys_dir = Path(mounts["tls"]["mountPath"]), Path(mounts["auth-keys"]["mountPath"])
    assert mounts["tls"]["readOnly"] and mounts["auth-keys"]["readOnly"]
    security = settings.security
    assert (security.tls_cert, security.tls_key) == (tls_dir / "tls.crt", tls_dir / "tls.key")
    assert security.auth_jwt_keys is not None and security.auth_jwt_keys.parent == keys_dir
    assert security.reflection is False

    # Kubernetes' gRPC probe cannot speak TLS: each probe runs the image's health check over TLS
    # against the port the server binds, readiness for the service it registers.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], f"{probe} still uses the plaintext gRPC probe"
        command = container[probe]["exec"]["command"]
        assert command[0] == "snaplearn-healthcheck"
        assert Path(command[command.index("--tls-ca") + 1]).parent == tls_dir
        assert f"127.0.0.1:{settings.port}" in command
    assert container["readinessProbe"]["exec"]["command"][-1] == service


# -- protos ------------------------------------------------------------------------------------


def test_buf_breaking_catches_an_incompatible_change(tools_bin: Path, tmp_path: Path) -> None:
    """Changing a field's type against the committed baseline must fail `buf breaking`."""
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos/snaplearn", protos / "snaplearn")
    (tmp_path / "buf.yaml").write_text("version: v2\nmodules:\n  - path: protos\n")
    vision = protos / "snaplearn/vision/v1/vision.proto"
    buf = str(tools_bin / "buf")
    baseline = str(REPO / "protos/buf-baseline.json")

    unchanged = subprocess.run(
        [buf, "breaking", "--against", baseline], cwd=tmp_path, capture_output=True, text=True
    )
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr

    vision.write_text(vision.read_text().replace("uint32 top_k = 3;", "uint64 top_k = 3;"))
    changed = subprocess.run(
        [buf, "breaking", "--against", baseline], cwd=tmp_path, capture_output=True, text=True
    )
    assert changed.returncode != 0
    assert 'changed type from "uint32" to "uint64"' in changed.stdout


def test_kubernetes_vision_gateway_sidecar_fronts_the_server(
    tools_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(tools_bin, "deploy/overlays/cpu-gateway")
    deployment = find(objects, "Deployment", "vision")
    vision, gateway = containers(deployment)
    assert (vision["name"], gateway["name"]) == ("vision", "gateway")
    environment = container_environment(objects, vision, image_environment(REPO / "docker/Dockerfile"))
    settings, read = settings_under(environment, vision_config.settings_from_args, monkeypatch)
    assert_all_read(environment, read, "vision", "overlay cpu-gateway, Deployment vision")

    # The gateway owns the pod's gRPC port (the Service's named port and the probes'), and
    # forwards to the port the server binds inside the pod.
    args = gateway["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    gateway_ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert gateway_ports["grpc"] == int(flags["--port"]) == 50051
    assert flags["--backend"] == f"127.0.0.1:{settings.port}" and settings.port != 50051
    assert {p["name"]: p["containerPort"] for p in vision["ports"]}["grpc-backend"] == settings.port
    service = find(objects, "Service", "vision")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["grpc"] == "grpc"
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert vision[probe]["grpc"]["port"] == 50051  # through the gateway, which forwards health
    # Its limit sits below the server's queue, so that the server rarely refuses itself.
    gateway_env = {e["name"]: e["value"] for e in gateway["env"]}
    assert 0 < int(gateway_env["SNAPLEARN_GATEWAY_MAX_IN_FLIGHT"]) < settings.max_queue_size
    assert gateway["image"].startswith("snaplearn-gateway:")
