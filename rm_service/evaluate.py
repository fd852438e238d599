"""`rm-service eval`: a model's pairwise accuracy, loss and calibration on any preference
file or store snapshot, overall and by number of turns and by length."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.runtime import ModelRuntime
from rm_service.models.version import open_model
from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
from rm_service.store.db import Pair, Store
from rm_service.train.data import is_heldout_pair
from rm_service.train.metrics import grouped_metrics, length_bucket, pair_metrics, turn_bucket


@dataclass
class EvalReport:
    overall: dict[str, float]
    by_turns: dict[str, dict[str, float]]
    by_length: dict[str, dict[str, float]]
    pairs_per_s: float


def load_for_eval(
    model: str | None, models: ModelSettings | None = None, store: Store | None = None
) -> tuple[ModelRuntime, str]:
    """A registry version (by name or directory), a reward checkpoint, a bundled name, an HF
    directory, or (None) the promoted version."""
    models = models or ModelSettings()
    if model is None:
        own = store is None
        store = store or Store(StoreSettings())
        try:
            rec = registry.promoted(store)
        finally:
            if own:
                store.close()
        if rec is None:
            raise FailedPrecondition("no promoted version in the registry; pass --model")
        model = rec.version
    runtime, meta = open_model(model, settings=models)
    return runtime, meta.version if meta is not None else Path(model).name


def file_pairs(path: Path, fmt: str) -> list[Pair]:
    """Pairs of any supported file, read through an in-memory store (same parsing as import)."""
    from rm_service.formats import import_file

    store = Store(StoreSettings(path=":memory:"))
    try:
        import_file(store, path, fmt)
        return store.pairs(store.create_snapshot())
    finally:
        store.close()


def snapshot_pairs(
    store: Store, snapshot_id: str | None, heldout_only: bool, settings: TrainSettings | None = None
) -> list[Pair]:
    """A snapshot's pairs; with heldout_only, the conversations training holds out."""
    settings = settings or TrainSettings()
    snapshot = store.get_snapshot(snapshot_id)
    if snapshot is None:
        raise FailedPrecondition("the store has no snapshot yet; train once or pass --data")
    pairs = store.pairs(snapshot)
    if heldout_only:
        pairs = [p for p in pairs if is_heldout_pair(p, settings)]
    return pairs


def evaluate_pairs(
    runtime: ModelRuntime, pairs: list[Pair], max_batch_tokens: int = 4096, show_progress: bool = True
) -> EvalReport:
    if not pairs:
        raise FailedPrecondition("no pairs to evaluate")
    items = [runtime.format(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)]
    bar = tqdm(total=len(items), desc="scoring", unit="seq", disable=not show_progress)
    start = time.monotonic()
    members = runtime.run(items, max_batch_tokens, progress=lambda n, _: bar.update(n))  # [2N, K]
    bar.close()
    raw = members.mean(axis=1).reshape(-1, 2)  # [N, 2]: chosen, rejected
    r_chosen, r_rejected = raw[:, 0], raw[:, 1]
    turns = [turn_bucket(sum(m.role == "user" for m in p.prompt)) for p in pairs]
    lengths = [length_bucket(max(len(items[2 * i]), len(items[2 * i + 1]))) for i in range(len(pairs))]
    return EvalReport(
        overall=pair_metrics(r_chosen, r_rejected),
        by_turns=grouped_metrics(r_chosen, r_rejected, turns),
        by_length=grouped_metrics(r_chosen, r_rejected, lengths),
        pairs_per_s=len(pairs) / max(time.monotonic() - start, 1e-9),
    )


def format_report(version: str, report: EvalReport) -> str:
    """The report as a markdown table: overall, then one row per turn and length bucket."""
    lines = [f"| {version} | pairs | accuracy | loss | ECE |", "|---|---:|---:|---:|---:|"]
    rows = [("all", report.overall)] + list(report.by_turns.items()) + list(report.by_length.items())
    for name, m in rows:
        lines.append(f"| {name} | {int(m['num_pairs'])} | {m['accuracy']:.4f} | {m['loss']:.4f} | {m['ece']:.4f} |")
    lines.append(f"\n{report.pairs_per_s:.1f} pairs/s")
    return "\n".join(lines)
