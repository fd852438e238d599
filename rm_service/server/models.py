"""The versions this server process has loaded, the one it serves by default, and hot-swap.

Hot-swap: a new version is loaded and warmed (its golden pairs re-scored) beside the old
one, then the default switches with one assignment; batches formed before the switch finish
on the old model, which stays loaded for pinned requests. A version that fails to load
leaves the old one serving. Scorers follow the registry through `promoted.json` in the
artifacts directory, so a replica needs no store to pick up promotions.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from rm_service import registry
from rm_service.errors import FailedPrecondition, NotFound, Unavailable
from rm_service.models.precision import describe
from rm_service.models.resolver import BUNDLED
from rm_service.models.runtime import ModelRuntime
from rm_service.models.version import VersionMeta, check_golden, is_version_dir, open_model, open_version, read_meta
from rm_service.registry import ModelRecord
from rm_service.settings import ModelSettings, ServeSettings
from rm_service.store.db import Store

log = logging.getLogger(__name__)


@dataclass
class Served:
    runtime: ModelRuntime
    record: ModelRecord
    backend: object  # what runs batches: the torch runtime or an ONNX Runtime session
    # A version trained on thumbs/outcomes: thumb_offset, outcome_offset (train.feedback).
    feedback: dict = field(default_factory=dict)


class ServedModels:
    def __init__(self, max_loaded: int = 2):
        self.versions: dict[str, Served] = {}
        self.default: str | None = None
        self.max_loaded = max_loaded
        self._watchers: set[asyncio.Queue] = set()
        self.failed: dict[str, str] = {}  # version -> why it could not be loaded
        self.pinned: set[str] = set()  # versions kept loaded beside the default (ServeSettings.also_load)
        self.loading = True  # until the server has loaded (and warmed) every version it starts with

    def get(self, version: str = "") -> Served:
        """The pinned version if loaded, else the default one. While the server is still loading
        its models a version it does not hold yet is Unavailable (retryable), not NotFound."""
        name = version or self.default
        if name is None or name not in self.versions:
            if self.loading:
                raise Unavailable(
                    f"the reward model is still loading (model version {version or 'default'!r}); retry shortly"
                )
            raise NotFound(
                f"model version {version!r} is not loaded by this server (loaded: {', '.join(self.versions) or 'none'})"
            )
        return self.versions[name]

    def swap_in(self, served: Served, kind: str = "promoted") -> None:
        """Make `served` the default (atomic for the event loop) and tell every watcher."""
        self.versions[served.record.version] = served
        previous, self.default = self.default, served.record.version
        while (
            len(self.versions) - len(self.pinned - {self.default}) > self.max_loaded
        ):  # unload the oldest swapped-out version
            oldest = next(v for v in self.versions if v != self.default and v not in self.pinned)
            del self.versions[oldest]
        if previous != self.default:
            log.info("now serving %s (was %s)", self.default, previous)
            for queue in self._watchers:
                queue.put_nowait((kind, served.record))

    def announce(self, kind: str, record: ModelRecord) -> None:
        """Tell every watcher about a version that is not served (e.g. a retrain "rejected" by the
        gate or its load check, or left a "candidate"), so trainers learn why nothing switched."""
        for queue in self._watchers:
            queue.put_nowait((kind, record))

    def pin(self, served: Served) -> None:
        """Keep `served` loaded for clients that pin it by version; it is never swapped out."""
        self.versions[served.record.version] = served
        self.pinned.add(served.record.version)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self.default is not None:
            queue.put_nowait(("current", self.versions[self.default].record))
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._watchers.discard(queue)


@dataclass(frozen=True)
class Target:
    """What `serve` will load: a registry version's directory (with its record when the store
    knows it), or an external model (a bundled name or an HF directory)."""

    directory: Path | None = None
    record: ModelRecord | None = None
    external: str | None = None


def resolve_for_serving(settings: ServeSettings, store: Store | None, models: ModelSettings) -> Target:
    """The model `serve` starts with: --model (a registry version, version directory, bundled
    name or HF directory), else the promoted version (from the store, or without one from the
    registry's promoted.json). Reads the registry and the version's version.json, so a registry
    that cannot be read fails here, in one line, before the server binds its port."""
    name = settings.model
    if name is not None and _is_external(name) and not is_version_dir(name):
        return Target(external=name)
    if name is not None and HUB_ID.fullmatch(name):  # not a directory here, and no version name has a slash
        raise FailedPrecondition(
            f"--model {name!r} is neither a registry version, a bundled model nor a directory here; it looks like a "
            "Hugging Face Hub id, and rm-service downloads nothing at run time. Download it first "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass --model DIR: a reward checkpoint "
            "(*ForSequenceClassification) is served as trained, a plain model gets an untrained head "
            "(`rm-service train --backbone DIR` trains a version on it)"
        )
    rec: ModelRecord | None = None
    if name is not None and is_version_dir(name):
        directory = Path(name)
    elif store is not None:
        rec = registry.get_model(store, name) if name else registry.promoted(store)
        if rec is None:
            raise FailedPrecondition(
                "no promoted reward model in the registry; run `rm-service train` or pass --model NAME|PATH"
            )
        directory = Path(rec.artifact_path)
    else:
        directory = Path(models.artifacts_dir) / name if name else _pointer_dir(models)
    read_meta(directory)
    return Target(directory, rec)


def load_for_serving(
    settings: ServeSettings, store: Store | None, models: ModelSettings, target: Target | None = None
) -> Served:
    """Load (and warm) the model of `target`, by default resolve_for_serving's."""
    target = target or resolve_for_serving(settings, store, models)
    if target.directory is not None:
        return load_version_dir(target.directory, settings, models, target.record)
    assert target.external is not None  # a Target is one or the other
    name = target.external
    runtime, _ = open_model(name, device=settings.device, precision=settings.precision, settings=models)
    rec = ModelRecord(
        Path(name).name,
        None,
        None,
        name,
        runtime.spec.hash,
        "external",
        {},
        0.0,
        1.0,
        runtime.model.ensemble_size,
        name,
    )
    return Served(runtime, rec, make_backend(runtime, settings))


def load_pinned(name: str, settings: ServeSettings, store: Store | None, models: ModelSettings) -> Served:
    """One of ServeSettings.also_load: a registry version by name, or any model --model takes."""
    return load_for_serving(
        settings, store, models, resolve_for_serving(settings.model_copy(update={"model": name}), store, models)
    )


def load_version_dir(
    directory: str | Path, settings: ServeSettings, models: ModelSettings, rec: ModelRecord | None = None
) -> Served:
    """Load and warm a registry version (the golden-pair check runs the model)."""
    runtime, meta = open_version(directory, device=settings.device, precision=settings.precision, settings=models)
    backend = make_backend(runtime, settings, Path(directory), meta)
    if rec is None:
        rec = ModelRecord(
            meta.version,
            meta.parent,
            meta.snapshot_id,
            meta.base_backbone,
            meta.format_hash,
            "promoted",
            meta.metrics,
            meta.reward_mean,
            meta.reward_std,
            meta.ensemble_size,
            str(directory),
        )
    return Served(runtime, rec, backend, dict(meta.info.get("feedback") or {}))


def make_backend(
    runtime: ModelRuntime, settings: ServeSettings, directory: Path | None = None, meta: VersionMeta | None = None
):
    """What runs batches (pad_id, run_collated): the torch runtime in its precision, or ONNX
    Runtime when the precision is fp32 on a CPU and the version was exported (and the backend
    setting allows it). An ONNX model must reproduce the version's golden scores before it serves."""
    onnx = (meta.onnx if meta is not None else None) or {}
    cpu_fp32 = runtime.device.type == "cpu" and runtime.precision == "fp32"
    wanted = settings.backend == "onnx" or (settings.backend == "auto" and cpu_fp32)
    if not wanted or not onnx.get("fp32_path"):
        if settings.backend == "onnx":
            raise FailedPrecondition(f"{directory}: backend onnx was asked for, but this version has no ONNX export")
        log.info(
            "serving %s with PyTorch, %s",
            meta.version if meta else runtime.backbone,
            describe(runtime.precision, runtime.device),
        )
        return runtime
    assert meta is not None and directory is not None  # only a version's meta records an ONNX export
    from rm_service.models.onnx_backend import OnnxRuntimeModel

    name = onnx["int8_path"] if settings.onnx_int8 and onnx.get("int8_kept") else onnx["fp32_path"]
    backend = OnnxRuntimeModel.for_runtime(runtime, directory / name)
    check_golden(
        runtime,
        meta.golden,
        directory,
        scorer=backend,
        precision="fp32",
        cause=f"the ONNX model {name} does not reproduce the trained model",
    )
    log.info("serving %s with ONNX Runtime (%s)", meta.version, name)
    return backend


def _pointer_dir(models: ModelSettings) -> Path:
    pointer = registry.read_promoted_pointer(models.artifacts_dir, strict=True)
    if pointer is None:
        raise FailedPrecondition(f"no promoted version in {models.artifacts_dir} (no promoted.json); pass --model")
    return Path(pointer["artifact_path"])


async def follow_registry(
    served: ServedModels, settings: ServeSettings, models: ModelSettings, interval: float
) -> None:
    """Poll promoted.json; hot-swap to each newly promoted version (forever, until cancelled)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        pointer = registry.read_promoted_pointer(models.artifacts_dir)
        if pointer is None or pointer["version"] == served.default or pointer["version"] in served.failed:
            continue
        version = pointer["version"]
        if version in served.versions:  # a rollback to a version still loaded
            served.swap_in(served.versions[version], "rolled_back")
            continue
        log.info("promotion of %s seen: loading it beside %s", version, served.default)
        try:
            new = await loop.run_in_executor(None, load_version_dir, pointer["artifact_path"], settings, models)
        except Exception as exc:  # noqa: BLE001 - a bad candidate must never take the server down
            served.failed[version] = str(exc)
            log.error("could not load %s; %s keeps serving: %s", version, served.default, exc)
            continue
        served.swap_in(new)


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as vLLM, TEI and transformers take a model


def _is_external(name: str) -> bool:
    return name in BUNDLED or Path(name).exists()
