"""Generate the Python gRPC code for proto/rm/v1 into rm_service/api/v1.

    python tools/gen_proto.py            # write the generated files
    python tools/gen_proto.py --check    # exit 1 if the committed files are stale

protoc writes absolute imports (`from rm.v1 import common_pb2`); they are rewritten to the
package path (`from rm_service.api.v1 import common_pb2`) so the code needs no sys.path edits.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_DIR = ROOT / "rm_service" / "api" / "v1"
IMPORT_RE = re.compile(r"^from rm\.v1 import ", re.MULTILINE)


def generate() -> dict[str, str]:
    """Run protoc and return {file name: rewritten source}."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "rm" / "v1").glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *protos,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        out = {}
        for path in sorted((Path(tmp) / "rm" / "v1").iterdir()):
            out[path.name] = IMPORT_RE.sub("from rm_service.api.v1 import ", path.read_text())
    out["__init__.py"] = '"""Generated from proto/rm/v1 by tools/gen_proto.py. Do not edit."""\n'
    return out


def stale_files(generated: dict[str, str]) -> list[str]:
    """Names of files that differ from, are missing from, or are extra in OUT_DIR."""
    on_disk = {p.name for p in OUT_DIR.glob("*") if p.is_file()} if OUT_DIR.exists() else set()
    stale = [n for n, src in generated.items() if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != src]
    return sorted(stale + list(on_disk - set(generated)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    generated = generate()
    if args.check:
        stale = stale_files(generated)
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run `make proto`", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("*"):
        if old.is_file() and old.name not in generated:
            old.unlink()
    for name, src in generated.items():
        (OUT_DIR / name).write_text(src)
    print(f"wrote {len(generated)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
