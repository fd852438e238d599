"""`rm-service eval`: pairwise accuracy of any model on any preference file."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.runtime import ModelRuntime, load_backbone_runtime
from rm_service.settings import ModelSettings, StoreSettings
from rm_service.store.hh import HHFormatError, read_pairs
from rm_service.train.metrics import pair_metrics


def load_for_eval(model: str | None, models: ModelSettings | None = None) -> tuple[ModelRuntime, str]:
    """A registry version (by name or directory), a bundled name, an HF directory, or the promoted version."""
    models = models or ModelSettings()
    if model is None:
        from rm_service.store.db import Store

        store = Store(StoreSettings())
        try:
            rec = registry.promoted(store)
        finally:
            store.close()
        if rec is None:
            raise FailedPrecondition("no promoted version in the registry; pass --model")
        model = rec.version
    version_dir = Path(models.artifacts_dir) / model
    if (version_dir / "version.json").exists():
        return registry.load_artifact(version_dir, settings=models)[0], model
    if (Path(model) / "version.json").exists():
        runtime, meta = registry.load_artifact(model, settings=models)
        return runtime, meta["version"]
    return load_backbone_runtime(model, max_tokens=1024, settings=models), Path(model).name


def evaluate_file(runtime: ModelRuntime, path: Path, limit: int | None = None, max_batch_tokens: int = 4096) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    pairs = [p for _, _, p in read_pairs(path) if not isinstance(p, HHFormatError)][:limit]
    items = [runtime.format(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)]
    bar = tqdm(total=len(items), desc="scoring", unit="seq")
    start = time.monotonic()
    members = runtime.run(items, max_batch_tokens, progress=lambda n, _: bar.update(n))  # [2N, K]
    bar.close()
    raw = members.mean(axis=1).reshape(-1, 2)  # [N, 2]: chosen, rejected
    metrics = pair_metrics(raw[:, 0], raw[:, 1])
    metrics["pairs_per_s"] = len(pairs) / max(time.monotonic() - start, 1e-9)
    return metrics
