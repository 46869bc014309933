#!/usr/bin/env bash
# Creates .venv and installs every SnapLearn distribution (editable) with the dev tools.
# Re-installs only when a pyproject.toml changed, so `make up` / `make test` stay fast after the first run.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "SnapLearn needs Python >= 3.11 (found $("$python" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

# One distribution per top-level folder (pyproject.toml says which); one pip run resolves the
# dependencies between them (snaplearn-vision needs snaplearn-common, which needs snaplearn-api).
distributions=(protos clients/python 'services[kafka]' vision_server recommender_worker benchmarks .)
stamp=.venv/.snaplearn-installed
want=$(cat pyproject.toml protos/pyproject.toml clients/python/pyproject.toml services/pyproject.toml \
  vision_server/pyproject.toml recommender_worker/pyproject.toml benchmarks/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing SnapLearn's distributions and dev tools into .venv (first run: torch is a large download)"
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
  # The single distribution of earlier versions would shadow the split ones.
  .venv/bin/python -m pip uninstall --quiet --yes snaplearn 2>/dev/null || true
  args=()
  for distribution in "${distributions[@]}"; do args+=(-e "$distribution"); done
  .venv/bin/python -m pip install --progress-bar off "${args[@]}"
  echo "$want" > "$stamp"
fi
