"""Generate the Python gRPC code for proto/rm/v1 into the light client,
clients/python/rm_client/api/v1: the one generated copy (the client distribution must not
import the server package, which pins torch; rm_service.api.v1 re-exports the client's).

    python tools/gen_proto.py            # write the generated files
    python tools/gen_proto.py --check    # exit 1 if the committed files are stale

protoc writes absolute imports (`from rm.v1 import common_pb2`); they are rewritten to the
package's path (`from rm_client.api.v1 import common_pb2`) so the code needs no sys.path edits.
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
OUT_DIR = ROOT / "clients" / "python" / "rm_client" / "api" / "v1"  # the one copy; rm_service.api.v1 re-exports it
TARGETS = {"rm_client.api.v1": OUT_DIR}  # package -> directory
IMPORT_RE = re.compile(r"^from rm\.v1 import ", re.MULTILINE)


def generate(package: str = "rm_client.api.v1") -> dict[str, str]:
    """Run protoc and return {file name: source with imports rewritten to `package`}."""
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
            out[path.name] = IMPORT_RE.sub(f"from {package} import ", path.read_text())
    out["__init__.py"] = '"""Generated from proto/rm/v1 by tools/gen_proto.py. Do not edit."""\n'
    return out


def stale_files(generated: dict[str, str], out_dir: Path = OUT_DIR) -> list[str]:
    """Names of files that differ from, are missing from, or are extra in `out_dir`."""
    on_disk = {p.name for p in out_dir.glob("*") if p.is_file()} if out_dir.exists() else set()
    stale = [n for n, src in generated.items() if not (out_dir / n).exists() or (out_dir / n).read_text() != src]
    return sorted(stale + list(on_disk - set(generated)))


def write(generated: dict[str, str], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*"):
        if old.is_file() and old.name not in generated:
            old.unlink()
    for name, src in generated.items():
        (out_dir / name).write_text(src)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    generated = {out_dir: generate(package) for package, out_dir in TARGETS.items()}
    if args.check:
        stale = [
            f"{(out_dir / name).relative_to(ROOT)}"
            for out_dir, files in generated.items()
            for name in stale_files(files, out_dir)
        ]
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run `make proto`", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for out_dir, files in generated.items():
        write(files, out_dir)
        print(f"wrote {len(files)} files to {out_dir.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
