"""The monitoring configuration against the servers' real /metrics, checked by promtool.

A vision server and a recommender run as separate processes (ports 0, the small trained model,
the embedded bus), serve one photo and one recommendation so that their labelled series exist,
and are scraped. Then:
  - `promtool check metrics` accepts both scrapes (exposition format and naming conventions);
  - every SnapLearn metric the alert rules, the Grafana dashboard and the prometheus-adapter rules
    name is in a scrape, so a renamed metric cannot silently blank a panel or an alert;
  - every dashboard query is valid PromQL (promtool parses them as recording rules);
  - the adapter's queries, instantiated as prometheus-adapter does, give the per-pod values the
    HorizontalPodAutoscalers expect (promtool test rules);
  - the container health check (docker/healthcheck.py) reports both servers SERVING.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from snaplearn_client import RecommenderClient, VisionClient
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.system import embedded_system
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy/monitoring"
RULES = MONITORING / "prometheus/rules/snaplearn-alerts.yml"
DASHBOARD = MONITORING / "grafana/snaplearn-dashboard.json"
ADAPTER = MONITORING / "prometheus-adapter/config.yaml"
METRIC_NAME = re.compile(r"\bsnaplearn_[a-z0-9_]+")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from scripts/deploy_tools.sh (Debian's prometheus package; cached)."""
    installed = subprocess.run(
        ["bash", str(REPO / "scripts/deploy_tools.sh")], capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, f"installing the deploy tools failed:\n{installed.stderr}"
    found = shutil.which("promtool", path=f"{installed.stdout.strip()}:/usr/bin:/usr/local/bin")
    assert found, "deploy_tools.sh finished but promtool is not on PATH"
    return found


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
    trained_model_repository: Path,  # noqa: F811
) -> Iterator[dict[str, dict[str, Any]]]:
    """Both servers, after one Classify and one Recommend; yields their ready-file contents."""
    with embedded_system(tmp_path_factory.mktemp("metrics") / "var", trained_model_repository) as running:
        with VisionClient(running.vision_target, timeout_s=30) as client:
            client.classify(sample_image_bytes("fractions", seed=1), "metrics-student")
        with RecommenderClient(running.recommender_target) as client:
            deadline = time.monotonic() + 60
            while client.recommend("metrics-student", k=3).cold_start:
                assert time.monotonic() < deadline, "the recommender did not apply the event within 60 s"
                time.sleep(0.05)
        yield {"vision": running.vision, "recommender": running.recommender}


@pytest.fixture(scope="module")
def scrapes(servers: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {
        name: urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10)
        .read()
        .decode()
        for name, ports in servers.items()
    }


def exported_names(exposition: str) -> set[str]:
    """Series names in a scrape: its samples, plus what its TYPE lines declare.

    A labelled counter has no samples until a first label value is seen (no error has happened
    yet, say) but is declared all the same, so queries on it are right.
    """
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            suffixes = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum")}
            names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


@pytest.mark.parametrize("server", ["vision", "recommender"])
def test_promtool_accepts_the_real_metrics(server: str, scrapes: dict[str, str], promtool: str) -> None:
    assert METRIC_NAME.search(scrapes[server]), f"no SnapLearn metrics in the {server} scrape"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=scrapes[server], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", f"promtool's lint findings:\n{checked.stdout}"


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER.read_text())["rules"]


def test_monitoring_names_only_metrics_the_servers_export(scrapes: dict[str, str]) -> None:
    exported = exported_names(scrapes["vision"]) | exported_names(scrapes["recommender"])
    alerts = yaml.safe_load(RULES.read_text())["groups"]
    sources = {
        "alert rules": "\n".join(rule["expr"] for group in alerts for rule in group["rules"]),
        "Grafana dashboard": "\n".join(dashboard_queries()),
        "prometheus-adapter rules": "\n".join(rule["seriesQuery"] for rule in adapter_rules()),
    }
    for source, text in sources.items():
        named = set(METRIC_NAME.findall(text))
        assert named, f"{source} names no SnapLearn metric"
        missing = sorted(named - exported)
        assert not missing, f"{source} use metrics no server exports: {missing}"


def instantiate(template: str, series: str, matchers: str, group_by: str) -> str:
    """What prometheus-adapter does with a metricsQuery template for one request."""
    return (
        template.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    grafana_variables = {"$__rate_interval": "1m", "$namespace": "snaplearn"}
    rules = []
    for number, query in enumerate(queries):
        for variable, value in grafana_variables.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"unhandled Grafana variable in {query}"
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


RECOMMEND_COUNT = "snaplearn_recommender_recommend_latency_seconds_count"
# Input series for the adapter check: (metric, labels, promtool values notation).
ADAPTER_INPUT = [
    # In flight: pod-a steady at 4, pod-b at 10; the same pod name in another namespace is ignored.
    ("snaplearn_vision_in_flight_requests", 'namespace="snaplearn",pod="pod-a"', "4x10"),
    ("snaplearn_vision_in_flight_requests", 'namespace="snaplearn",pod="pod-b"', "10x10"),
    ("snaplearn_vision_in_flight_requests", 'namespace="other",pod="pod-a"', "99x10"),
    # Queue depth: summed over a pod's models.
    ("snaplearn_vision_queue_depth", 'namespace="snaplearn",pod="pod-a",model="m:1"', "3x10"),
    ("snaplearn_vision_queue_depth", 'namespace="snaplearn",pod="pod-a",model="m:2"', "5x10"),
    ("snaplearn_vision_queue_depth", 'namespace="snaplearn",pod="pod-b",model="m:1"', "0x10"),
    # Recommend calls: pod-a 60 a minute over two cold_start labels (1/s), pod-b 600 a minute (10/s).
    (RECOMMEND_COUNT, 'namespace="snaplearn",pod="pod-a",cold_start="false"', "0+30x10"),
    (RECOMMEND_COUNT, 'namespace="snaplearn",pod="pod-a",cold_start="true"', "0+30x10"),
    (RECOMMEND_COUNT, 'namespace="snaplearn",pod="pod-b",cold_start="false"', "0+600x10"),
]  # fmt: skip
# What each adapter metric must be per pod, given ADAPTER_INPUT.
ADAPTER_EXPECTED = {
    "snaplearn_vision_in_flight_requests": {"pod-a": 4, "pod-b": 10},
    "snaplearn_vision_queue_depth": {"pod-a": 8, "pod-b": 0},
    "snaplearn_recommender_recommend_per_second": {"pod-a": 1, "pod-b": 10},
}


def test_adapter_queries_give_the_per_pod_values_the_autoscalers_expect(
    promtool: str, tmp_path: Path
) -> None:
    rules = {rule["name"]["as"]: rule for rule in adapter_rules()}
    assert set(rules) == set(ADAPTER_EXPECTED)
    matchers = 'namespace="snaplearn",pod=~"pod-a|pod-b"'
    expression_tests = [
        {
            "expr": instantiate(rule["metricsQuery"], rule["name"]["matches"].strip("^$"), matchers, "pod"),
            "eval_time": "5m",
            "exp_samples": [
                {"labels": f'{{pod="{pod}"}}', "value": value}
                for pod, value in ADAPTER_EXPECTED[name].items()
            ],
        }
        for name, rule in rules.items()
    ]
    unit_test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"{metric}{{{labels}}}", "values": values}
                    for metric, labels, values in ADAPTER_INPUT
                ],
                "promql_expr_test": expression_tests,
            }
        ],
    }
    path = tmp_path / "adapter-queries.test.yml"
    path.write_text(yaml.safe_dump(unit_test))
    tested = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.mark.parametrize(
    ("server", "service"),
    [
        ("vision", "snaplearn.vision.v1.VisionService"),
        ("recommender", "snaplearn.recommender.v1.RecommenderService"),
    ],
)
def test_container_healthcheck_reports_serving(
    server: str, service: str, servers: dict[str, dict[str, Any]]
) -> None:
    target = f"127.0.0.1:{servers[server]['port']}"
    healthcheck = [sys.executable, str(REPO / "docker/healthcheck.py"), target]
    serving = subprocess.run([*healthcheck, service], capture_output=True, text=True, timeout=30)
    assert serving.returncode == 0, serving.stdout + serving.stderr
    assert serving.stdout.strip() == f"{target} {service}: SERVING"
    unknown = subprocess.run([*healthcheck, "no.such.Service"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr
