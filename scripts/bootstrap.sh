#!/usr/bin/env bash
# Creates .venv and installs SnapLearn (editable) with its dev tools.
# Re-installs only when pyproject.toml changed, so `make up` / `make test` stay fast after the first run.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "SnapLearn needs Python >= 3.11 (found $("$python" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.snaplearn-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing SnapLearn and its dependencies into .venv (first run: torch is a large download)"
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
  .venv/bin/python -m pip install --progress-bar off -e '.[dev]'
  echo "$want" > "$stamp"
fi
