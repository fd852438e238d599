"""Generate docs/api.md, the API reference, from the comments in proto/rm/v1/*.proto.

    python tools/gen_api_docs.py            # write docs/api.md
    python tools/gen_api_docs.py --check    # exit 1 if docs/api.md is stale

protoc parses the files and keeps their comments (`--include_source_info`); this script only
renders the resulting descriptors, so the reference cannot disagree with the API.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "docs" / "api.md"

# Source-location path tags of FileDescriptorProto / DescriptorProto / ServiceDescriptorProto.
MESSAGE, SERVICE, ENUM = 4, 6, 5
FIELD, NESTED, METHOD, VALUE = 2, 3, 2, 2

TYPE_NAMES = {v: k[len("TYPE_") :].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def descriptors() -> descriptor_pb2.FileDescriptorSet:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "rm" / "v1").glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *protos,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """{location path: its leading (or trailing) comment, whitespace-normalised}."""
    out = {}
    for loc in file.source_code_info.location:
        text = (loc.leading_comments or loc.trailing_comments).strip()
        if text:
            out[tuple(loc.path)] = " ".join(line.strip() for line in text.splitlines()).replace("|", "\\|")
    return out


def field_type(f: descriptor_pb2.FieldDescriptorProto, maps: dict[str, str]) -> str:
    name = f.type_name.lstrip(".") if f.type_name else TYPE_NAMES[f.type]
    if name in maps:
        return maps[name]
    name = name.removeprefix("rm.v1.")
    repeated = f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    return f"repeated {name}" if repeated else name


def map_entries(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Full names of synthetic map-entry messages -> `map<K, V>`."""
    out = {}
    for m in file.message_type:
        for nested in m.nested_type:
            if nested.options.map_entry:
                key, value = nested.field
                out[f"{file.package}.{m.name}.{nested.name}"] = f"map<{field_type(key, {})}, {field_type(value, {})}>"
    return out


def render_file(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    notes, maps = comments(file), map_entries(file)
    lines = [f"## `{file.name}`", ""]
    for si, service in enumerate(file.service):
        lines += [
            f"### service `{service.name}`",
            "",
            "| RPC | request | response | what it does |",
            "|---|---|---|---|",
        ]
        for mi, method in enumerate(service.method):
            stream = "stream " if method.server_streaming else ""
            lines.append(
                f"| `{method.name}` | `{method.input_type.split('.')[-1]}` | "
                f"`{stream}{method.output_type.split('.')[-1]}` | {notes.get((SERVICE, si, METHOD, mi), '')} |"
            )
        lines.append("")
    for mi, message in enumerate(file.message_type):
        lines += [f"### message `{message.name}`", ""]
        if (MESSAGE, mi) in notes:
            lines += [notes[(MESSAGE, mi)], ""]
        if message.field:
            lines += ["| field | number | type | meaning |", "|---|---:|---|---|"]
            for fi, f in enumerate(message.field):
                lines.append(
                    f"| `{f.name}` | {f.number} | `{field_type(f, maps)}` | {notes.get((MESSAGE, mi, FIELD, fi), '')} |"
                )
            lines.append("")
    for ei, enum in enumerate(file.enum_type):
        lines += [f"### enum `{enum.name}`", ""]
        if (ENUM, ei) in notes:
            lines += [notes[(ENUM, ei)], ""]
        lines += ["| value | number | meaning |", "|---|---:|---|"]
        for vi, value in enumerate(enum.value):
            lines.append(f"| `{value.name}` | {value.number} | {notes.get((ENUM, ei, VALUE, vi), '')} |")
        lines.append("")
    return lines


def render() -> str:
    files = [f for f in descriptors().file if f.name.startswith("rm/v1/")]
    lines = [
        "# API reference (package `rm.v1`)",
        "",
        "Generated from the comments in `proto/rm/v1/*.proto` by `tools/gen_api_docs.py`; do not edit by hand",
        "(`make docs` regenerates it, and a test fails when it is stale). Status codes: see [serving](serving.md)",
        "(API overview) and `rm_service/errors.py`. The HTTP routes that OpenRLHF, verl and vLLM clients call",
        "(`POST /get_reward`, `/classify`, `/pooling`) and readiness (`GET /health`, gRPC health): [http.md](http.md).",
        "",
    ]
    for file in sorted(files, key=lambda f: ("common" not in f.name, f.name)):
        lines += render_file(file)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the generated text")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
