"""The versions this server process has loaded, the one it serves by default, and hot-swap.

Hot-swap (server.swap): a new version is loaded and warmed (its golden pairs re-scored) beside
the default, then the default switches with one assignment; batches formed before the switch
finish on the old model, which stays loaded for pinned requests. Memory is bounded: each
loaded version holds one copy of its weights, in the precision served (`ModelRuntime.serve_only`),
measured once loaded (`Served.weight_bytes`, models.memory); swapped-out versions beyond
`max_loaded` are released *before* a new one loads, so a swap holds at most the default plus
the new version (plus the pinned ones). A version that fails to load leaves the old one
serving and is tried again with backoff (`failed`). Scorers follow the registry through
`promoted.json` in the artifacts directory, so a replica needs no store to pick up promotions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rm_service import registry
from rm_service.errors import FailedPrecondition, NotFound, Unavailable
from rm_service.models.backend import RewardBackend
from rm_service.models.memory import held_bytes
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
    runtime: ModelRuntime  # or, in a user model's ServedModels, a usermodel.runtime.UserRuntime
    record: ModelRecord
    backend: RewardBackend  # what runs batches: the torch runtime or an ONNX Runtime session
    # A version trained on thumbs/outcomes: thumb_offset, outcome_offset (train.feedback).
    feedback: dict = field(default_factory=dict)
    weight_bytes: int = 0  # measured once loaded: the distinct storages of its weights (models.memory)
    device: str = "cpu"

    def measure(self) -> Served:
        """Record the bytes its weights hold now (the runtime and, if another, the backend's modules)."""
        self.weight_bytes = held_bytes([self.runtime, self.backend])
        self.device = str(self.runtime.device)
        return self


@dataclass
class LoadFailure:
    """A version that could not be loaded, and when it is tried again."""

    error: str
    attempts: int = 1
    next_try: float = 0.0  # time.monotonic()

    def __str__(self) -> str:
        return self.error


class ServedModels:
    """The loaded versions of one kind of model (`what`: "reward model" or "user model")."""

    def __init__(self, max_loaded: int = 2, what: str = "reward model"):
        self.what = what
        self.versions: dict[str, Served] = {}
        self.default: str | None = None
        self.max_loaded = max_loaded
        self._watchers: set[asyncio.Queue] = set()
        self.failed: dict[str, LoadFailure] = {}  # version -> why it could not be loaded, and when it is tried again
        self.load_failures: dict[str, int] = {}  # version -> failed loads since start (a metric)
        self.pinned: set[str] = set()  # versions kept loaded beside the default (ServeSettings.also_load)
        self.loading = True  # until the server has loaded (and warmed) every version it starts with
        self.last_swap: dict[str, int | str] = {}  # bytes held at each step of the last hot-swap (server.swap)

    def get(self, version: str = "") -> Served:
        """The pinned version if loaded, else the default one. While the server is still loading
        its models a version it does not hold yet is Unavailable (retryable), not NotFound."""
        name = version or self.default
        if name is None or name not in self.versions:
            if self.loading:
                raise Unavailable(
                    f"the {self.what} is still loading (model version {version or 'default'!r}); retry shortly"
                )
            why = f"; its load failed ({self.failed[name]})" if name in self.failed else ""
            raise NotFound(
                f"{self.what} version {version!r} is not loaded by this server "
                f"(loaded: {', '.join(self.versions) or 'none'})" + why
            )
        return self.versions[name]

    def held_bytes(self) -> int:
        """Bytes of weights every loaded version holds together, measured now (shared storages once)."""
        return held_bytes([obj for s in self.versions.values() for obj in (s.runtime, s.backend)])

    def release_for_load(self) -> list[str]:
        """Before a new version loads: release the swapped-out versions that it would push past
        `max_loaded`, oldest first, and return their names. The default and pinned stay."""
        released = []
        while len(self._unpinned()) + 1 > self.max_loaded:
            evictable = [v for v in self._unpinned() if v != self.default]
            if not evictable:
                break
            del self.versions[evictable[0]]
            released.append(evictable[0])
        if released:
            free_memory()
        return released

    def _unpinned(self) -> list[str]:
        return [v for v in self.versions if v not in self.pinned]

    def record_failure(self, version: str, error: str, first_wait: float, max_wait: float) -> LoadFailure:
        """Remember a failed load; the next try waits first_wait, doubled per failure up to max_wait."""
        attempts = self.failed[version].attempts + 1 if version in self.failed else 1
        wait = min(max_wait, first_wait * 2 ** (attempts - 1))
        self.failed[version] = LoadFailure(error, attempts, time.monotonic() + wait)
        self.load_failures[version] = self.load_failures.get(version, 0) + 1
        return self.failed[version]

    def waiting(self, version: str) -> bool:
        """True while a version whose load failed waits out its backoff."""
        failure = self.failed.get(version)
        return failure is not None and time.monotonic() < failure.next_try

    def health(self) -> dict:
        """What /health reports about the models: default, loaded versions with their bytes, failed loads."""
        now = time.monotonic()
        return {
            "default": self.default,
            "loaded": {v: {"weight_bytes": s.weight_bytes, "device": s.device} for v, s in self.versions.items()},
            "load_failures": {
                v: {"error": f.error, "attempts": f.attempts, "retry_in_s": round(max(0.0, f.next_try - now), 1)}
                for v, f in self.failed.items()
            },
        }

    def swap_in(self, served: Served, kind: str = "promoted") -> None:
        """Make `served` the default (atomic for the event loop) and tell every watcher."""
        self.versions[served.record.version] = served
        self.failed.pop(served.record.version, None)
        previous, self.default = self.default, served.record.version
        released = False
        while (
            len(self.versions) - len(self.pinned - {self.default}) > self.max_loaded
        ):  # unload the oldest swapped-out version
            oldest = next(v for v in self.versions if v != self.default and v not in self.pinned)
            del self.versions[oldest]
            released = True
        if released:
            free_memory()
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
    runtime, _ = open_model(name, device=settings.device, precision=settings.precision, settings=models, serving=True)
    rec = ModelRecord.external(name, runtime.spec.hash, runtime.model.ensemble_size)
    return serving(Served(runtime, rec, make_backend(runtime, settings)))


def load_pinned(name: str, settings: ServeSettings, store: Store | None, models: ModelSettings) -> Served:
    """One of ServeSettings.also_load: a registry version by name, or any model --model takes."""
    return load_for_serving(
        settings, store, models, resolve_for_serving(settings.model_copy(update={"model": name}), store, models)
    )


def load_version_dir(
    directory: str | Path, settings: ServeSettings, models: ModelSettings, rec: ModelRecord | None = None
) -> Served:
    """Load and warm a registry version (the golden-pair check runs the model)."""
    runtime, meta = open_version(
        directory, device=settings.device, precision=settings.precision, settings=models, serving=True
    )
    backend = make_backend(runtime, settings, Path(directory), meta)
    if rec is None:
        rec = ModelRecord.of_version(meta, str(directory), "promoted")
    return serving(Served(runtime, rec, backend, dict(meta.info.get("feedback") or {})))


def serving(served: Served) -> Served:
    """A loaded version as it serves: one copy of its weights in the served precision, measured."""
    served.runtime.serve_only()
    return served.measure()


def free_memory() -> None:
    """Return released versions' memory: a full collection (models may sit in reference cycles,
    and the server froze its start-up objects out of the collector) and, on CUDA, the cached blocks."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_backend(
    runtime: ModelRuntime, settings: ServeSettings, directory: Path | None = None, meta: VersionMeta | None = None
) -> RewardBackend:
    """What runs batches (pad_id, run_collated): the torch runtime in its precision, or ONNX
    Runtime when the precision is fp32 on a CPU and the version was exported (and the backend
    setting allows it). An ONNX model must reproduce the version's golden scores before it serves."""
    onnx = (meta.onnx if meta is not None else None) or {}
    cpu_fp32 = runtime.device.type == "cpu" and runtime.precision == "fp32"
    if settings.backend == "onnx" and not cpu_fp32:
        raise FailedPrecondition(
            f"backend onnx runs the fp32 export on the CPU; this server runs {runtime.precision} on {runtime.device}: "
            "set backend torch (or auto), or device cpu and precision fp32"
        )
    wanted = settings.backend == "onnx" or (settings.backend == "auto" and cpu_fp32)
    if not wanted or not onnx.get("fp32_path"):
        if settings.backend == "onnx":
            raise FailedPrecondition(f"{directory}: backend onnx was asked for, but this version has no ONNX export")
        log.info(
            "serving %s with PyTorch, %s",
            meta.version if meta else runtime.backbone,
            describe(runtime.precision, runtime.device, runtime.config),
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
    log.info(
        "serving %s with ONNX Runtime (%s), %s",
        meta.version,
        name,
        describe(runtime.precision, runtime.device, runtime.config),
    )
    return backend


def _pointer_dir(models: ModelSettings) -> Path:
    pointer = registry.read_promoted_pointer(models.artifacts_dir, strict=True)
    if pointer is None:
        raise FailedPrecondition(f"no promoted version in {models.artifacts_dir} (no promoted.json); pass --model")
    return Path(pointer["artifact_path"])


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as vLLM, TEI and transformers take a model


def _is_external(name: str) -> bool:
    return name in BUNDLED or Path(name).exists()
