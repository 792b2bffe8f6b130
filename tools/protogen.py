"""Generates the Python package for proto/ into gen/python, or checks that it is current.

Usage: python tools/protogen.py [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "gen" / "python"


def generate(out_dir: Path) -> None:
    """Runs protoc (from grpcio-tools) on every .proto under proto/ into ``out_dir``."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    # google/api/{annotations,http}.proto (the HTTP mapping of the public API) come from the
    # googleapis-common-protos wheel, which also ships their generated modules at run time.
    spec = importlib.util.find_spec("google.api.annotations_pb2")
    if spec is None or spec.origin is None:
        raise SystemExit("googleapis-common-protos is not installed")
    googleapis = Path(spec.origin).parents[2]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"-I{googleapis}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def stale_files(current: Path, fresh: Path) -> list[str]:
    """Lists files that differ between the committed and a freshly generated tree."""
    have, want = _tree(current), _tree(fresh)
    differing = [
        name
        for name in want
        if name not in have or not filecmp.cmp(have[name], want[name], shallow=False)
    ]
    extra = [name for name in have if name not in want]
    return sorted(differing + extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/python is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "python"
        generate(fresh)
        if args.check:
            stale = stale_files(OUT_ROOT, fresh)
            if stale:
                print(
                    "generated protobuf code is stale; run `make proto`:",
                    *stale,
                    sep="\n  ",
                    file=sys.stderr,
                )
                return 1
            print("generated protobuf code is current")
            return 0
        shutil.rmtree(OUT_ROOT, ignore_errors=True)
        shutil.copytree(fresh, OUT_ROOT)
    print(f"generated {OUT_ROOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
