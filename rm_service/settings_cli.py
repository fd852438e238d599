"""Command-line flags generated from settings models, for `rm-service` and `policy-trainer`.

Each field of a pydantic-settings model becomes `--field-name` (booleans also `--no-field-name`),
its help the field's description followed, once, by its environment variable and its default,
in the style of text-embeddings-inference:

    --max-batch-tokens <N>
                        Token budget of one model batch (padded tokens: count x longest). ...
                        [env: RM_SERVE_MAX_BATCH_TOKENS] [default: 2048]

A flag's value reaches pydantic as the text typed, so it is validated exactly as its environment
variable is; a flag not given leaves the field to the environment and then the default. `none`
sets an optional field to None. `validation_message` turns a pydantic ValidationError (from a
flag, an environment variable or a config file) into the one line a CLI prints before exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings

NONE_WORDS = ("none", "null")
_TAIL = (
    "\n"  # separates a flag's description from its [env: ...] [default: ...]; a plain HelpFormatter reads it as a space
)
_FLAGGED: dict[
    str, tuple[set[str], dict[str, list[str]]]
] = {}  # settings class name -> (fields with a flag, their aliases)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(model: type[BaseModel], name: str) -> str:
    return str(model.model_config.get("env_prefix") or "") + name.upper()


def _dest(model: type[BaseModel], name: str) -> str:
    return f"{model.__name__}.{name}"  # namespaced: two models on one command, or a plain argument, never collide


def _unwrap(annotation) -> tuple[object, bool]:
    """The field's type without None, and whether None is allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _metavar(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (list, tuple, set):
        return "<A,B,...>"
    if isinstance(kind, type):
        for base, word in ((int, "N"), (float, "NUMBER"), (Path, "PATH"), (SecretStr, "SECRET")):
            if issubclass(kind, base):
                return f"<{word}>"
    return "<TEXT>"


def _default_text(field) -> str | None:
    if field.default_factory is not None or field.is_required() or field.default is None:
        return None  # computed defaults (paths under $RM_HOME) are said in the description
    value = field.default
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or None
    return str(value) if value != "" else '""'


def _help_text(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    tail = f"[env: {env_name(model, name)}]"
    if (default := _default_text(field)) is not None:
        tail += f" [default: {default}]"
    return ((field.description or "") + _TAIL + tail).replace("%", "%%")


class _Switch(argparse.Action):
    """A boolean field: `--name` sets it, `--no-name` (and any alias starting with --no-) clears it."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    exclude: Iterable[str] = (),
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """One flag per field of `model` (but `exclude`), in an argument group named after it.
    `aliases` adds option strings to a field's flag (for a boolean, an alias that starts with
    --no- clears it)."""
    aliases, exclude = aliases or {}, set(exclude)
    about = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    if exclude:
        about += " Environment only: " + ", ".join(env_name(model, n) for n in model.model_fields if n in exclude) + "."
    group = parser.add_argument_group(
        f"{model.__name__} (flags override {env_name(model, '')}* variables)", about.replace("%", "%%")
    )
    names = [n for n in model.model_fields if n not in exclude]
    _FLAGGED[model.__name__] = (set(names), aliases)
    for name in names:
        field = model.model_fields[name]
        kind, _ = _unwrap(field.annotation)
        options = [flag(name), *aliases.get(name, [])]
        common: dict[str, typing.Any] = {
            "dest": _dest(model, name),
            "default": argparse.SUPPRESS,
            "help": _help_text(model, name),
        }
        if kind is bool:
            group.add_argument(options[0], "--no-" + options[0][2:], *options[1:], action=_Switch, **common)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(*options, choices=[str(c) for c in typing.get_args(kind)], **common)
        else:
            group.add_argument(*options, metavar=_metavar(kind), **common)


def flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The fields of `model` given as flags, as typed (`none` -> None for optional fields)."""
    values = {}
    for name, field in model.model_fields.items():
        dest = _dest(model, name)
        if hasattr(args, dest):
            value = getattr(args, dest)
            if isinstance(value, str) and value.lower() in NONE_WORDS and _unwrap(field.annotation)[1]:
                value = None
            values[name] = value
    return values


def _settings_class(name: str) -> type[BaseSettings] | None:
    pending = list(BaseSettings.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def validation_message(err: ValidationError) -> str:
    """One line naming each bad field, the value given, its flag (when it has one) and its
    environment variable."""
    model = _settings_class(err.title)
    flagged, aliases = _FLAGGED.get(err.title, (set(), {}))
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or err.title  # a model validator's error names the settings class
        msg = e["msg"].removeprefix("Value error, ")
        name = str(e["loc"][0]) if e["loc"] else ""
        field = model.model_fields.get(name) if model is not None else None
        where = []
        got = e.get("input")
        if (
            field is not None
            and isinstance(got, str | int | float)
            and len(str(got)) <= 60
            and "SecretStr" not in str(field.annotation)
        ):
            where.append(f"got {got!r}")
        if name in flagged:
            where.append("flag " + "/".join([flag(name), *aliases.get(name, [])]))
        if field is not None and model is not None:
            where.append("env " + env_name(model, name))
        parts.append(f"{loc}: {msg}" + (f" ({'; '.join(where)})" if where else ""))
    return "invalid settings: " + "; ".join(parts)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a flag's description and keeps its `[env: ...] [default: ...]` whole, on a line of its own."""

    def __init__(self, prog, indent_increment=2, max_help_position=32, width=None):
        super().__init__(prog, indent_increment, max_help_position, width)

    def _split_lines(self, text, width):
        text, tail, settings = text.rpartition(_TAIL) if _TAIL in text else (text, "", "")
        lines = super()._split_lines(text, width) if text.strip() else []
        return lines + ([settings] if tail else [])


def package_version(distribution: str = "rm-service") -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # a checkout run without installing it
        from rm_service import __version__

        return __version__


def add_version_flag(parser: argparse.ArgumentParser, distribution: str = "rm-service") -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version(distribution)}")


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser (`add_subparsers(parser_class=CommandParser)`) whose settings flags
    are added when it is used, to parse or for help: a command imports only its own settings
    modules (DemoSettings pulls in torch)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._pending: list[tuple[type[BaseModel] | typing.Callable[[], type[BaseModel]], dict]] = []

    def settings_flags(self, load: type[BaseModel] | typing.Callable[[], type[BaseModel]], **options) -> None:
        """`add_settings_flags(self, model, **options)` once this command is used; `load` is the
        settings model or a function that imports and returns it."""
        self._pending.append((load, options))

    def _add_pending(self) -> None:
        while self._pending:
            load, options = self._pending.pop(0)
            add_settings_flags(self, load if isinstance(load, type) else load(), **options)

    def _parse_known_args(self, *args, **kwargs):
        self._add_pending()
        return super()._parse_known_args(*args, **kwargs)

    def format_usage(self):
        self._add_pending()
        return super().format_usage()

    def format_help(self):
        self._add_pending()
        return super().format_help()
