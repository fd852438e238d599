"""The versions this server process has loaded, and the one it serves by default."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rm_service import registry
from rm_service.errors import FailedPrecondition, NotFound
from rm_service.models.resolver import BUNDLED
from rm_service.models.runtime import ModelRuntime, load_backbone_runtime
from rm_service.registry import ModelRecord
from rm_service.settings import ModelSettings, ServeSettings
from rm_service.store.db import Store

log = logging.getLogger(__name__)


@dataclass
class Served:
    runtime: ModelRuntime
    record: ModelRecord


class ServedModels:
    def __init__(self):
        self.versions: dict[str, Served] = {}
        self.default: str | None = None

    def add(self, served: Served, make_default: bool = True) -> None:
        self.versions[served.record.version] = served
        if make_default or self.default is None:
            self.default = served.record.version

    def get(self, version: str = "") -> Served:
        """The pinned version if loaded, else the default one."""
        name = version or self.default
        if name is None or name not in self.versions:
            raise NotFound(f"model version {version!r} is not loaded by this server (loaded: {', '.join(self.versions) or 'none'})")
        return self.versions[name]


def load_for_serving(settings: ServeSettings, store: Store | None, models: ModelSettings) -> Served:
    """The model `serve` starts with: --model (a registry version, bundled name or HF
    directory) or else the promoted version of the registry."""
    name = settings.model
    if store is not None and (name is None or not _is_external(name)):
        rec = registry.get_model(store, name) if name else registry.promoted(store)
        if rec is None:
            raise FailedPrecondition("no promoted reward model in the registry; run `rm-service train` or pass --model NAME|PATH")
        runtime, _ = registry.load_artifact(rec.artifact_path, device=settings.device, settings=models)
        return Served(runtime, rec)
    if name is None:
        raise FailedPrecondition("no store to read the registry from; pass --model NAME|PATH")
    if _is_version_dir(name):
        runtime, meta = registry.load_artifact(name, device=settings.device, settings=models)
        rec = ModelRecord(meta["version"], meta.get("parent"), meta.get("snapshot_id"), meta["backbone"], meta["format_hash"],
                          "external", meta.get("metrics", {}), meta["reward_mean"], meta["reward_std"], meta["ensemble_size"], name)
        return Served(runtime, rec)
    runtime = load_backbone_runtime(name, max_tokens=1024, device=settings.device)
    version = Path(name).name
    rec = ModelRecord(version, None, None, name, runtime.spec.hash, "external", {}, 0.0, 1.0, runtime.model.ensemble_size, name)
    return Served(runtime, rec)


def _is_version_dir(name: str) -> bool:
    return (Path(name) / "version.json").exists()


def _is_external(name: str) -> bool:
    return name in BUNDLED or Path(name).exists()
