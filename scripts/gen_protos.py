"""Regenerate the Python code for protos/ into protos/python/ (committed; the snaplearn-api distribution).

Usage: python scripts/gen_protos.py [--check]

Two include roots, one protoc run each:
- protos/ (minus protos/oip/): our own APIs, generated as snaplearn.<api>.v1;
- protos/oip/: the vendored Open Inference Protocol (package `inference`), generated as
  snaplearn_oip.* so that it cannot clash with another copy (tritonclient's) in site-packages.
  Its descriptors also go to a private descriptor pool instead of protobuf's default one:
  tritonclient registers the same `inference.*` names from other files, and two files defining
  one name in one pool fail at import ("duplicate symbol"), so a process that serves OIP and
  uses tritonclient (a test, an embedding app) could not import both.

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
OIP_ROOT = PROTO_ROOT / "oip"
OUT_ROOT = PROTO_ROOT / "python"
# (include root, top-level package it generates); each root's files are generated only once.
ROOTS = ((PROTO_ROOT, "snaplearn"), (OIP_ROOT, "snaplearn_oip"))
GENERATED_TOPS = tuple(top for _, top in ROOTS)
PRIVATE_POOL_TOPS = ("snaplearn_oip",)
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def proto_files(root: Path) -> list[Path]:
    """The .proto files of one include root, without those of a nested root (protos/oip)."""
    nested = [other for other, _ in ROOTS if other != root and other.is_relative_to(root)]
    return sorted(p for p in root.rglob("*.proto") if not any(p.is_relative_to(n) for n in nested))


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    for root, top in ROOTS:
        files = [str(p.relative_to(root)) for p in proto_files(root)]
        args = [
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {root.relative_to(REPO)}")
        # Make every generated folder a regular package so mypy and setuptools find them.
        for folder in [out_dir / top, *(out_dir / top).rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__":
                (folder / "__init__.py").touch()
        if top in PRIVATE_POOL_TOPS:
            for module in (out_dir / top).rglob("*_pb2.py"):
                code = module.read_text()
                if code.count(_DEFAULT_POOL) != 1:
                    raise SystemExit(f"{module}: expected one {_DEFAULT_POOL!r} to make the pool private")
                module.write_text(code.replace(_DEFAULT_POOL, _PRIVATE_POOL))


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root)
        for top in GENERATED_TOPS
        if (root / top).is_dir()
        for p in (root / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


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
    tops = ", ".join(str(OUT_ROOT / top) for top in GENERATED_TOPS)
    print(f"generated {len(generated_files(OUT_ROOT))} files under {tops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
