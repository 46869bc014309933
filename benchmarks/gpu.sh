#!/usr/bin/env bash
# One prepared GPU run of the model-format benchmark (issue 19), for a bare CUDA machine whose
# python3 already holds torch, torchvision, grpcio, protobuf, pillow and onnxruntime.
#
#   benchmarks/gpu.sh --fetch-wheels        # HERE, with network: fill var/gpu-wheelhouse (see below)
#   benchmarks/gpu.sh                       # THERE: ResNet-50 224x224 on cuda, in under 8 minutes
#   benchmarks/gpu.sh --device cpu --quick  # a rehearsal of every step on a CPU machine
#
# What it measures (benchmarks/model_formats.py, once per configuration): the bare runtime's
# bound at its best batch size and our server's capacity and half-load p99 for ResNet-50 served
# as TorchScript, an ExportedProgram and ONNX, in fp32, then fp16 and bf16 (the torch formats:
# the ONNX file is an fp32 graph), all channels_last. The ResNet-50 files are exported once and
# reused by every configuration. Results: docs/benchmarks/gpu_model_formats.md (+ .json), which
# docs/BENCHMARKS.md cites; each configuration's own page and JSON under var/gpu-runs/.
#
# Nothing is fetched on the GPU machine: what its python3 lacks (or has too old for the
# generated gRPC code: grpcio >= 1.85.1, protobuf >= 7.35.1) comes from var/gpu-wheelhouse
# (wheels for CPython 3.10-3.12, 61 MB; the ONNX exporter's onnx + ml_dtypes for 3.11 and 3.12+
# only: elsewhere ONNX is left out and said so), unpacked into var/gpu-site (no pip needed there).
# Carry it to the device: run(command="bash benchmarks/gpu.sh", carry=["var/gpu-wheelhouse"]).
# A step that fails is written into the results and the next one runs.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
DEVICE=cuda
QUICK=0
FETCH=0
OUT=docs/benchmarks/gpu_model_formats.md
WHEELS=var/gpu-wheelhouse
SITE=var/gpu-site
RUNS=var/gpu-runs
EXPORTS=var/gpu-exports
BUDGET_S=${GPU_BUDGET_S:-450} # stop starting configurations after this: the whole run < 8 min

while [[ $# -gt 0 ]]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --fetch-wheels) FETCH=1; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# name==version [min version the run needs] (the pure-Python ones and the per-CPython binaries)
PURE="grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 prometheus-client==0.26.0 pydantic==2.14.4
pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 PyJWT==2.15.1
tqdm==4.70.1 pycparser==3.12 typing-extensions==4.16.0"
BINARY="pydantic-core==2.50.5 cffi==2.1.1 grpcio==1.85.1 protobuf==7.36.2"
ABI3="cryptography==51.0.1" # one abi3 wheel for every CPython >= 3.9
ONNX="onnx==1.23.2 ml-dtypes==0.5.4" # torch.onnx.export needs them; CPython 3.11 and 3.12+ only (size)

if [[ $FETCH == 1 ]]; then
  mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps -q -d "$WHEELS" $PURE
  for version in 310 311 312; do
    wanted=$BINARY
    [[ $version != 310 ]] && wanted="$BINARY $ONNX"
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps -q -d "$WHEELS" --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      $wanted
  done
  "$PY" -m pip download --no-deps -q -d "$WHEELS" --only-binary=:all: --python-version 310 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 $ABI3
  du -sh "$WHEELS"
  exit 0
fi

started=$(date +%s)
log() { echo "[gpu.sh $(date -u +%H:%M:%S), +$(($(date +%s) - started)) s] $*" >&2; }

# -- 1. what python3 lacks, from the wheelhouse -----------------------------------------------
mkdir -p "$SITE"
"$PY" - "$WHEELS" "$SITE" <<'EOF'
import importlib.metadata as metadata
import pathlib
import re
import sys
import zipfile

wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
# distribution -> (module to import, minimum version the run needs or None)
NEEDED = {
    "grpcio": ("grpc", "1.85.1"), "protobuf": ("google.protobuf", "7.35.1"),
    "grpcio-health-checking": ("grpc_health", None), "grpcio-reflection": ("grpc_reflection", None),
    "prometheus-client": ("prometheus_client", None), "pydantic": ("pydantic", "2.11"),
    "pydantic-core": ("pydantic_core", None), "pydantic-settings": ("pydantic_settings", "2.10"),
    "python-dotenv": ("dotenv", None), "annotated-types": ("annotated_types", None),
    "typing-inspection": ("typing_inspection", None), "typing-extensions": ("typing_extensions", "4.14.1"),
    "PyJWT": ("jwt", None), "cryptography": ("cryptography", None), "cffi": ("cffi", None),
    "pycparser": ("pycparser", None), "tqdm": ("tqdm", None), "onnx": ("onnx", None),
    "ml_dtypes": ("ml_dtypes", None),
}
OPTIONAL = {"onnx", "ml_dtypes"}  # without them: no ONNX export, the other formats still run
# a run that needs pydantic-core from us needs the matching pydantic too (and the reverse)
TOGETHER = [
    {"pydantic", "pydantic-core"}, {"grpcio", "grpcio-health-checking", "grpcio-reflection"}, {"onnx", "ml_dtypes"},
]
py = f"{sys.version_info.major}{sys.version_info.minor}"


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def has(dist, module, minimum):
    if (site / ".installed" / dist).exists():
        return True
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return minimum is None or version_tuple(installed) >= version_tuple(minimum)


def wheel_for(dist):
    stem = dist.lower().replace("-", "_")
    for path in sorted(wheels.glob("*.whl")):
        name, _version, *tags = path.stem.split("-")
        if name.lower() != stem:
            continue
        python_tag, abi = tags[-3], tags[-2]
        if python_tag == "py3" or python_tag == f"cp{py}":
            return path
        if abi == "abi3" and int(python_tag[3:]) <= int(py[1:]):
            return path
    return None


missing = {dist for dist, (module, minimum) in NEEDED.items() if not has(dist, module, minimum)}
for group in TOGETHER:
    if missing & group:
        missing |= group
problems = []
no_onnx = site / ".no-onnx"
no_onnx.unlink(missing_ok=True)
if missing & OPTIONAL and not all(wheel_for(dist) for dist in missing & OPTIONAL):
    print(f"no onnx wheels for CPython {py}: ONNX is left out of this run", file=sys.stderr)
    no_onnx.write_text("onnx or ml_dtypes missing, and no wheel for this CPython\n")
    missing -= OPTIONAL
for dist in sorted(missing):
    wheel = wheel_for(dist)
    if wheel is None:
        problems.append(f"{dist} (no wheel for CPython {py} in {wheels}: run `benchmarks/gpu.sh --fetch-wheels`)")
        continue
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (site / ".installed").mkdir(exist_ok=True)
    (site / ".installed" / dist).write_text(wheel.name)
    print(f"installed {wheel.name} into {site}", file=sys.stderr)
if problems:
    sys.exit("missing: " + "; ".join(problems))
EOF
export PYTHONPATH="$REPO/$SITE:$REPO/protos/python:$REPO/services:$REPO/vision_server:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"

# -- 2. preflight: everything the run imports, and the device ----------------------------------
mkdir -p "$RUNS"
"$PY" - "$DEVICE" >"$RUNS/preflight.txt" <<'EOF'
import sys

import onnxruntime
import torch
import torchvision

import snaplearn_bench.model_formats  # noqa: F401
import snaplearn_bench.pyloadgen  # noqa: F401
import snaplearn_vision.main  # noqa: F401
import snaplearn_vision.server  # noqa: F401

device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("preflight: --device cuda but torch.cuda.is_available() is False")
name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
line = (f"preflight ok: torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime "
      f"{onnxruntime.__version__} {onnxruntime.get_available_providers()}, device {name}, Python "
      f"{sys.version.split()[0]}")
print(line, file=sys.stderr)
print(line)
EOF
log "preflight done"

# -- 3. the configurations ---------------------------------------------------------------------
if [[ $QUICK == 1 ]]; then
  COMMON=(--models mobilenet_v3_small --size 64 --seconds 1 --raw-seconds 0.3 --warmup 0.5
    --batch-sizes 1,8 --max-batch-size 8 --concurrency 8 --connections 4 --torch-threads 1 --decode-threads 1)
  CONFIGS=("fp32 nhwc torchscript,torch_export,onnx" "fp32 nchw onnx")
  PER_RUN_S=400
else
  THREADS=$(($(nproc) / 4 > 0 ? $(nproc) / 4 : 1))
  COMMON=(--models resnet50 --seconds 4 --raw-seconds 1.5 --warmup 1.5 --batch-sizes 1,16,64,128
    --max-batch-size 64 --concurrency 128 --connections 32 --torch-threads "$THREADS"
    --decode-threads "$(($(nproc) / 2))")
  if [[ $DEVICE == cuda ]]; then
    CONFIGS=("fp32 nhwc torchscript,torch_export,onnx" "fp16 nhwc torchscript,torch_export"
      "bf16 nhwc torchscript,torch_export" "fp16 nchw torchscript")
  else
    CONFIGS=("fp32 nhwc torchscript,torch_export,onnx")
  fi
  PER_RUN_S=240
fi
mkdir -p "$RUNS" "$EXPORTS"
mv "$RUNS/preflight.txt" "$SITE/preflight.txt"
find "$RUNS" -mindepth 1 -delete
mv "$SITE/preflight.txt" "$RUNS/preflight.txt"
for config in "${CONFIGS[@]}"; do
  read -r precision layout formats <<<"$config"
  if [[ -e $SITE/.no-onnx ]]; then
    formats=$(echo "$formats" | sed -e 's/,onnx//' -e 's/^onnx,//' -e 's/^onnx$//')
    [[ -z $formats ]] && continue
  fi
  name="$precision-$layout"
  left=$((BUDGET_S + 30 - ($(date +%s) - started)))
  ((left > PER_RUN_S)) && left=$PER_RUN_S
  if ((left < 60)); then
    log "$name: skipped (past the ${BUDGET_S} s budget)"
    echo "skipped: past the ${BUDGET_S} s budget" >"$RUNS/$name.skipped"
    continue
  fi
  flag=--channels-last
  [[ $layout == nchw ]] && flag=--no-channels-last
  log "$name: $formats"
  if ! timeout "$left" "$PY" benchmarks/model_formats.py "${COMMON[@]}" --device "$DEVICE" \
    --precision "$precision" "$flag" --formats "$formats" --no-peers --export-dir "$EXPORTS" \
    --out "$RUNS/$name" >"$RUNS/$name.out" 2>"$RUNS/$name.err"; then
    log "$name: exited with an error (kept: $RUNS/$name.err; its rows say which format failed)"
  fi
done

# -- 4. one page -------------------------------------------------------------------------------
"$PY" - "$RUNS" "$OUT" "$DEVICE" "$(($(date +%s) - started))" <<'EOF'
import json
import pathlib
import sys

from snaplearn_bench.model_formats import markdown_table, verdicts

runs, out, device, elapsed = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = [f"# ResNet-50 formats on {device} (benchmarks/gpu.sh)", ""]
if (runs / "preflight.txt").exists():
    lines += [(runs / "preflight.txt").read_text().strip(), ""]
if pathlib.Path("var/gpu-site/.no-onnx").exists():
    lines += ["ONNX left out: no onnx/ml_dtypes for this CPython in the wheelhouse.", ""]
combined = {}
for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
    result = json.loads((folder / "model_formats.json").read_text()) if (folder / "model_formats.json").exists() else None
    if result is None:
        continue
    combined[folder.name] = result
for name in sorted({p.stem for p in runs.glob("*.out")} | {p.stem for p in runs.glob("*.skipped")}):
    lines.append(f"## {name}")
    lines.append("")
    if name in combined:
        meta = combined[name]["meta"]
        lines.append(f"`{meta['command']}` ({meta['machine']})")
        lines.append("")
        lines += [f"- {sentence}" for sentence in verdicts(combined[name])]
        lines += ["", markdown_table(combined[name]), ""]
    elif (runs / f"{name}.skipped").exists():
        lines += [(runs / f"{name}.skipped").read_text().strip(), ""]
    else:
        tail = (runs / f"{name}.err").read_text().strip().splitlines()[-5:]
        lines += ["no result; the end of its log:", "", "```", *tail, "```", ""]
lines.append(f"Whole run: {elapsed} s.")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines) + "\n")
out.with_suffix(".json").write_text(json.dumps(combined, indent=2) + "\n")
print(out.read_text())
EOF
log "wrote $OUT and ${OUT%.md}.json"
