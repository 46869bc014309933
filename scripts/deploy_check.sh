#!/usr/bin/env bash
# Validates everything SnapLearn ships for deployment, offline, with real tools: the API contract
# (buf), the committed Go stubs, the container files (hadolint, the compose-spec schema), every
# Kubernetes manifest as rendered by kustomize (Kubernetes' own OpenAPI schemas, strict), and the
# Prometheus configuration, alert rules and their unit tests (promtool). `make deploy-check` runs
# it and `make test` depends on it. Tools come from scripts/deploy_tools.sh (cached).
#
# The checks that need live servers (promtool on a real /metrics scrape, the Go/Java/TypeScript
# clients against real servers) are pytest tests: tests/integration/test_metrics_promtool.py,
# tests/e2e/test_app_clients.py. docs/DEPLOY.md lists what is validated and what is not.
#
# Every check runs even when an earlier one failed; the exit status is 1 if any failed.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
TOOLS_BIN="$(bash scripts/deploy_tools.sh)"
PATH="$TOOLS_BIN:$PATH"
TOOLS_PYTHON="$TOOLS_BIN/../venv/bin/python"

# The oldest Kubernetes the manifests promise to work on (native gRPC probes are GA in 1.27;
# 1.30 is the oldest release with upstream support left) and the newest the schemas know.
KUBERNETES_VERSIONS=(1.30.0 1.37.0)
KUSTOMIZATIONS=(deploy/overlays/cpu deploy/overlays/gpu deploy/overlays/cpu-gateway deploy/overlays/cpu-secure deploy/monitoring)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
failed=()

# check NAME COMMAND...: runs COMMAND, prints ok/FAIL with its output on failure.
check() {
    local name="$1" output
    shift
    if output="$("$@" 2>&1)"; then
        printf 'ok    %s\n' "$name"
    else
        printf 'FAIL  %s\n' "$name"
        printf '%s\n' "$output" | sed 's/^/      /'
        failed+=("$name")
    fi
}

go_stubs_fresh() {
    buf generate --template protos/go/buf.gen.yaml -o "$WORK/go"
    diff -r "$WORK/go/protos/go/gen" protos/go/gen ||
        { echo "protos/go/gen is stale: run 'make go-gen'"; return 1; }
}

gofmt_clean() {
    local unformatted
    unformatted="$(gofmt -l protos/go clients/go services/gateway benchmarks/loadgen)"
    [[ -z "$unformatted" ]] || { echo "not gofmt-formatted: $unformatted"; return 1; }
}

render() { # render KUSTOMIZATION -> prints the rendered file's path
    local out="$WORK/$(echo "$1" | tr '/' '_').yaml"
    kustomize build "$1" >"$out"
    echo "$out"
}

validate_rendered() { # validate_rendered FILE VERSION
    kubernetes-validate --strict --quiet --kubernetes-version "$2" "$1"
}

# Debian's promtool is built without Kubernetes service discovery, so `kubernetes_sd_configs`
# is replaced by an equivalent static target; everything else (relabelling, rule files) is
# checked as written.
k8s_prometheus_config() {
    "$TOOLS_PYTHON" - deploy/monitoring/prometheus/prometheus.yml "$WORK/prometheus-k8s.yml" <<'EOF'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
for job in config["scrape_configs"]:
    if job.pop("kubernetes_sd_configs", None) is not None:
        job["static_configs"] = [{"targets": ["pod.example:9101"]}]
yaml.safe_dump(config, open(sys.argv[2], "w"))
EOF
    if promtool check config "$REPO_ROOT/deploy/monitoring/prometheus/prometheus.yml" >/dev/null 2>&1; then
        return 0 # a promtool with Kubernetes discovery accepts the file as written
    fi
    promtool check config "$WORK/prometheus-k8s.yml"
}

echo "== API contract (protos/snaplearn)"
check "buf lint" buf lint
check "buf breaking against protos/buf-baseline.json" buf breaking --against protos/buf-baseline.json
check "protos/go/gen is what buf generate makes" go_stubs_fresh
check "gofmt (every Go module)" gofmt_clean

echo "== containers (docker/)"
check "hadolint docker/Dockerfile docker/Dockerfile.cuda docker/Dockerfile.recommender docker/Dockerfile.gateway" \
    hadolint docker/Dockerfile docker/Dockerfile.cuda docker/Dockerfile.recommender docker/Dockerfile.gateway
check "compose-spec schema: docker/docker-compose.yml docker/docker-compose.secure.yml docker/kafka-compose.yml" \
    check-jsonschema --builtin-schema vendor.compose-spec docker/docker-compose.yml docker/docker-compose.secure.yml docker/kafka-compose.yml
check "yamllint deploy/ docker/ buf configs" yamllint --strict -c deploy/yamllint.yaml deploy docker buf.yaml \
    protos/go/buf.gen.yaml clients/typescript/buf.gen.yaml

echo "== Kubernetes (deploy/)"
for kustomization in "${KUSTOMIZATIONS[@]}"; do
    if rendered="$(render "$kustomization" 2>"$WORK/render.err")"; then
        printf 'ok    kustomize build %s (%s objects)\n' "$kustomization" "$(grep -c '^kind:' "$rendered")"
        for version in "${KUBERNETES_VERSIONS[@]}"; do
            check "  schemas of Kubernetes $version (strict)" validate_rendered "$rendered" "$version"
        done
    else
        printf 'FAIL  kustomize build %s\n' "$kustomization"
        sed 's/^/      /' "$WORK/render.err"
        failed+=("kustomize build $kustomization")
    fi
done

echo "== Prometheus and Grafana (deploy/monitoring, docker/prometheus)"
check "promtool check config docker/prometheus/prometheus.yml" promtool check config docker/prometheus/prometheus.yml
check "promtool check config deploy/monitoring/prometheus/prometheus.yml" k8s_prometheus_config
check "promtool check rules" promtool check rules deploy/monitoring/prometheus/rules/*.yml
check "promtool test rules" promtool test rules deploy/monitoring/prometheus/tests/*.yml
check "grafana dashboard is JSON" "$TOOLS_PYTHON" -m json.tool deploy/monitoring/grafana/snaplearn-dashboard.json

if ((${#failed[@]})); then
    printf '\ndeploy-check: %d check(s) failed:\n' "${#failed[@]}"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "deploy-check: all checks passed"
