"""Every settings class as a markdown table (environment variable, default, meaning).

    .venv/bin/python tools/settings_table.py            # print the tables of docs/configuration.md
    .venv/bin/python tools/settings_table.py --write    # rewrite them in the docs (make docs)

Tests check that docs/configuration.md and docs/policy-trainer.md hold exactly these tables, so the docs
cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's settings, not an installed copy's

from pydantic_settings import BaseSettings

from rm_service import settings as s
from rm_service.demo.settings import DemoSettings
from rm_service.judge.settings import JudgeSettings
from rm_service.usermodel.settings import UserModelSettings

CLASSES = [
    s.StoreSettings,
    s.ModelSettings,
    s.ServeSettings,
    s.SecuritySettings,
    s.TrainSettings,
    UserModelSettings,
    JudgeSettings,
    DemoSettings,
]


def default_text(cls: type[BaseSettings], name: str, field) -> str:
    if field.default_factory is not None:
        return {
            "path": "`$RM_HOME/rm.duckdb`",
            "cache_dir": "`$RM_HOME/cache/models`",
            "artifacts_dir": "`$RM_HOME/registry`",
        }.get(name, "computed")
    if field.default is None:
        return "unset"
    value = field.default
    if hasattr(value, "get_secret_value"):
        return "unset"
    if (
        isinstance(value, Path) and value.is_absolute()
    ):  # a file the package ships: named from the checkout, not this machine
        value = value.relative_to(Path(__file__).resolve().parents[1])
    return f"`{value}`"


def table(cls: type[BaseSettings], own_only: bool = False) -> str:
    """`own_only`: only the fields a subclass adds or redefines (SessionSettings over PPOSettings)."""
    prefix = cls.model_config.get("env_prefix", "")
    base = cls.__mro__[1]
    title = f"**`{cls.__name__}`** ({cls.__doc__.strip().splitlines()[0].rstrip('.')}; prefix `{prefix}`"
    lines = [
        title + (f"; every `{base.__name__}` field too)" if own_only else ")"),
        "",
        "| Variable | Default | Description |",
        "|---|---|---|",
    ]
    for name, field in cls.model_fields.items():
        if own_only and name not in cls.__dict__.get("__annotations__", {}):
            continue
        lines.append(f"| `{prefix}{name.upper()}` | {default_text(cls, name, field)} | {field.description} |")
    return "\n".join(lines)


def render() -> str:
    return "\n\n".join(table(cls) for cls in CLASSES) + "\n"


def write_between(path: Path, begin: str, end: str, text: str) -> None:
    doc = path.read_text()
    start, stop = doc.index(begin) + len(begin), doc.index(end)
    path.write_text(doc[:start] + text + doc[stop:])


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        from policy_trainer.session_settings import SessionSettings
        from policy_trainer.settings import PPOSettings

        root = Path(__file__).resolve().parent.parent
        write_between(
            root / "docs" / "configuration.md", "<!-- SETTINGS:BEGIN -->\n", "<!-- SETTINGS:END -->", render()
        )
        write_between(
            root / "docs" / "policy-trainer.md",
            "<!-- PPO-SETTINGS:BEGIN -->\n",
            "<!-- PPO-SETTINGS:END -->",
            table(PPOSettings) + "\n",
        )
        write_between(
            root / "docs" / "policy-trainer.md",
            "<!-- SESSION-SETTINGS:BEGIN -->\n",
            "<!-- SESSION-SETTINGS:END -->",
            table(SessionSettings, own_only=True) + "\n",
        )
    else:
        print(render(), end="")
