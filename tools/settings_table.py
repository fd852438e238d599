"""Print every settings class as a markdown table (environment variable, default, meaning).

    .venv/bin/python tools/settings_table.py    # paste into README "Configuration"

A test checks that the README holds exactly this output, so the docs cannot drift.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings

from rm_service import settings as s
from rm_service.demo.settings import DemoSettings
from rm_service.judge.settings import JudgeSettings

CLASSES = [s.StoreSettings, s.ModelSettings, s.ServeSettings, s.SecuritySettings, s.TrainSettings, JudgeSettings, DemoSettings]


def default_text(cls: type[BaseSettings], name: str, field) -> str:
    if field.default_factory is not None:
        return {"path": "`$RM_HOME/rm.duckdb`", "cache_dir": "`$RM_HOME/cache/models`", "artifacts_dir": "`$RM_HOME/registry`"}.get(name, "computed")
    if field.default is None:
        return "unset"
    value = field.default
    if hasattr(value, "get_secret_value"):
        return "unset"
    return f"`{value}`"


def table(cls: type[BaseSettings]) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    lines = [f"**`{cls.__name__}`** ({cls.__doc__.strip().splitlines()[0].rstrip('.')}; prefix `{prefix}`)", "",
             "| Variable | Default | Description |", "|---|---|---|"]
    for name, field in cls.model_fields.items():
        lines.append(f"| `{prefix}{name.upper()}` | {default_text(cls, name, field)} | {field.description} |")
    return "\n".join(lines)


def render() -> str:
    return "\n\n".join(table(cls) for cls in CLASSES) + "\n"


if __name__ == "__main__":
    print(render(), end="")
