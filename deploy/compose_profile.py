"""compose.yaml's services as `podman run` arguments, for deploy_test.py.

The image test runs the policy trainer from the file compose runs (entrypoint, command, the
service's own environment with `${VAR:?...}` and `${VAR:-default}` interpolated, its volumes,
the health checks its `depends_on` waits for), so the test cannot drift from what ships. What
podman-compose would add (a network where services resolve by name) the test builds with
`podman network create` and `--network-alias <service>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent / "compose.yaml"
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:\?|:-)([^}]*))?\}")


class ComposeError(ValueError):
    pass


def service(name: str, path: Path = COMPOSE) -> dict:
    """One service of the compose file, with its `<<:` merges resolved (as compose reads it)."""
    services = yaml.safe_load(path.read_text(encoding="utf-8"))["services"]
    if name not in services:
        raise ComposeError(f"{path.name} has no service {name!r} (it has {', '.join(services)})")
    return services[name]


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}` (an empty value counts as unset)."""

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if variables.get(name):
            return variables[name]
        if operator == ":-":
            return argument
        raise ComposeError(f"{name} is not set: {argument or 'required'}")

    return _VARIABLE.sub(substitute, value)


def environment(spec: dict, variables: Mapping[str, str]) -> dict[str, str]:
    """The service's environment (a mapping or a list of KEY=VALUE), interpolated."""
    raw = spec.get("environment") or {}
    pairs = raw.items() if isinstance(raw, dict) else (item.split("=", 1) for item in raw)
    return {key: interpolate(str(value), variables) for key, value in pairs}


def volumes(spec: dict, variables: Mapping[str, str], named: Mapping[str, str], base: Path) -> list[str]:
    """`--volume` values: named volumes renamed through `named` (a test's own volumes), host paths
    relative to the compose file's directory made absolute."""
    out = []
    for entry in spec.get("volumes") or []:
        source, target = interpolate(entry, variables).split(":", 1)
        if source.startswith((".", "/")):
            source = str((base / source).resolve())
        elif source in named:
            source = named[source]
        else:
            raise ComposeError(f"volume {source!r} has no name in this run (known: {', '.join(named)})")
        out.append(f"{source}:{target}")
    return out


def run_arguments(
    spec: dict, variables: Mapping[str, str], named: Mapping[str, str], overrides: Mapping[str, str], base: Path
) -> tuple[list[str], list[str]]:
    """(`podman run` options, arguments after the image) of one service: its entrypoint, its
    environment then `overrides` (the test's settings, e.g. a short run), its volumes."""
    options: list[str] = []
    entrypoint = spec.get("entrypoint")
    if entrypoint:
        options += ["--entrypoint", entrypoint if isinstance(entrypoint, str) else json.dumps(entrypoint)]
    for key, value in {**environment(spec, variables), **overrides}.items():
        options += ["--env", f"{key}={value}"]
    for volume in volumes(spec, variables, named, base):
        options += ["--volume", volume]
    command = spec.get("command") or []
    return options, [command] if isinstance(command, str) else list(command)


def healthy_dependencies(spec: dict, path: Path = COMPOSE) -> dict[str, list[str]]:
    """{service: its healthcheck command} for every `depends_on` with `condition: service_healthy`."""
    depends = spec.get("depends_on") or {}
    out = {}
    for name, condition in depends.items() if isinstance(depends, dict) else ((n, {}) for n in depends):
        if (condition or {}).get("condition") == "service_healthy":
            test = service(name, path)["healthcheck"]["test"]
            if test[0] not in ("CMD", "CMD-SHELL"):
                raise ComposeError(f"{name}: healthcheck test {test!r} is not CMD or CMD-SHELL")
            out[name] = list(test[1:]) if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
    return out
