"""Regenerate the Python code for protos/ into clients/python/ (committed).

Usage: python scripts/gen_protos.py [--check]

--check generates into a temporary folder and exits 1 when the committed code differs,
so CI fails on stale generated code.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
OUT_ROOT = REPO / "clients" / "python"
GENERATED_TOP = "snaplearn"  # proto package root: snaplearn.<service>.v1


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make every generated folder a regular package so mypy and setuptools find them.
    for folder in [out_dir / GENERATED_TOP, *(out_dir / GENERATED_TOP).rglob("*")]:
        if folder.is_dir() and folder.name != "__pycache__":
            (folder / "__init__.py").touch()


def generated_files(root: Path) -> list[Path]:
    top = root / GENERATED_TOP
    return sorted(p.relative_to(root) for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(OUT_ROOT)
        stale = sorted(set(want) ^ set(have))
        stale += [p for p in want if p in have and not filecmp.cmp(fresh / p, OUT_ROOT / p, shallow=False)]
        if stale:
            stale_list = "\n  ".join(map(str, stale))
            print(f"generated code is stale; run `make protos`:\n  {stale_list}", file=sys.stderr)
            return 1
    print(f"generated code is up to date ({len(want)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if committed generated code is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    generate(OUT_ROOT)
    print(f"generated {len(generated_files(OUT_ROOT))} files under {OUT_ROOT / GENERATED_TOP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
