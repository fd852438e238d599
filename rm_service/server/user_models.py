"""The user model a server process serves beside its reward model, and its hot-swap.

`ServeSettings.user_model` names it: `promoted` (the registry's promoted user model, from the
store or, without one, from `<artifacts>/user/promoted.json`; followed through promotions
when `follow_registry`), a user version (u3), a version directory, or a causal LM (a bundled
name or an HF directory) served untuned, as status "external". A version loads only after
its golden items check in the precision served (usermodel.version). Hot-swap as for reward
models (server.models): the new version is loaded and warmed beside the old one, then the
default switches with one assignment; a call that started on the old one finishes on it; a
version that fails to load leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

from rm_service import registry
from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition
from rm_service.registry import ModelRecord
from rm_service.server.models import LoadFailure, Served, ServedModels
from rm_service.settings import ModelSettings, ServeSettings
from rm_service.store.db import Store
from rm_service.usermodel.generate import Sampling, simulate
from rm_service.usermodel.version import (
    is_user_version,
    open_user_version,
    versions_dir,
)

log = logging.getLogger(__name__)
PROMOTED = "promoted"


def resolve_user_model(name: str, store: Store | None, models: ModelSettings) -> Path | str:
    """The version directory (or, for an untuned causal LM, the name) `name` stands for."""
    if name == PROMOTED:
        rec = registry.promoted(store, "user") if store is not None else None
        if rec is not None:
            return Path(rec.artifact_path)
        pointer = registry.read_promoted_pointer(versions_dir(models), strict=True)
        if pointer is None:
            raise FailedPrecondition(
                "no promoted user model in the registry; run `rm-service user-model train` or set "
                "RM_SERVE_USER_MODEL (serve --user-model) to a version, a directory or a causal LM"
            )
        return Path(pointer["artifact_path"])
    for directory in (versions_dir(models) / name, Path(name)):
        if is_user_version(directory):
            return directory
    return name


def load_user_model(name: str, settings: ServeSettings, store: Store | None, models: ModelSettings) -> Served:
    """Load (and warm: one short sample) the user model `name` stands for."""
    from rm_service.usermodel.runtime import load_user_runtime

    target = resolve_user_model(name, store, models)
    if isinstance(target, Path):
        runtime, meta = open_user_version(target, settings.device, settings.precision, models)
        rec = ModelRecord.of_version(meta, str(target), "promoted")
    else:
        runtime = load_user_runtime(target, 512, settings.device, settings.precision, models)
        rec = ModelRecord.external(target, runtime.spec.hash, 1, kind="user")
    warm = [[Message("user", "Hello, can you help me?"), Message("assistant", "Of course. What do you need?")]]
    simulate(runtime, warm, Sampling(max_new_tokens=4))
    return Served(
        cast(Any, runtime), rec, cast(Any, runtime)
    )  # Served is typed for reward runtimes; the user's is its own


async def follow_user_registry(served: ServedModels, settings: ServeSettings, models: ModelSettings) -> None:
    """Poll `<artifacts>/user/promoted.json`; hot-swap to each newly promoted user model."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(settings.watch_interval_s)
        pointer = registry.read_promoted_pointer(versions_dir(models))
        if pointer is None or pointer["version"] == served.default or pointer["version"] in served.failed:
            continue
        version = pointer["version"]
        if version in served.versions:
            served.swap_in(served.versions[version], "rolled_back")
            continue
        log.info("promotion of user model %s seen: loading it beside %s", version, served.default)
        try:
            new = await loop.run_in_executor(None, load_user_model, pointer["artifact_path"], settings, None, models)
        except Exception as exc:  # noqa: BLE001 - a bad candidate must never take the server down
            served.failed[version] = LoadFailure(str(exc))
            log.error("could not load user model %s; %s keeps serving: %s", version, served.default, exc)
            continue
        served.swap_in(new)
