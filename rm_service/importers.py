"""Import and export of preference files (HH-RLHF text format)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from rm_service.store.db import Store
from rm_service.store.hh import HHFormatError, read_pairs, render_pair
from rm_service.store.labels import LabelIn

BATCH = 1000
log = logging.getLogger(__name__)


def hh_labels(path: Path, annotator: str = "hh-rlhf") -> tuple[list[LabelIn], list[str]]:
    """Labels of an HH file (source IMPORT; label_id from the line's hash, so a re-import is
    idempotent) and the reasons of lines that are not valid HH pairs."""
    labels, bad = [], []
    for number, digest, pair in read_pairs(path):
        if isinstance(pair, HHFormatError):
            bad.append(str(pair))
            continue
        labels.append(LabelIn(
            label_id=f"hh-{digest}", prompt=pair.prompt, responses=[pair.chosen, pair.rejected], ranks=[0, 1],
            source="IMPORT", annotator=annotator, metadata={"format": "hh", "file": path.name, "line": str(number)},
        ))
    return labels, bad


def import_hh(store: Store, path: Path, annotator: str = "hh-rlhf") -> tuple[Counter, list[str]]:
    """Import an HH file; returns counts per outcome and the reasons for rejected lines."""
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    labels, rejected = hh_labels(path, annotator)
    counts: Counter = Counter({"REJECTED": len(rejected)})
    for begin in range(0, len(labels), BATCH):
        for outcome in store.ingest(labels[begin : begin + BATCH], origin="dataset"):
            counts[outcome.status] += 1
            if outcome.status in ("REJECTED", "CONFLICT"):
                rejected.append(f"{outcome.label_id}: {outcome.reason}")
    return counts, rejected


def export_hh(store: Store, out: Path, snapshot_id: str | None = None) -> tuple[int, str]:
    """Write a snapshot's pairs in HH format (one line per chosen/rejected pair).

    HH text has only Human and Assistant turns: pairs whose prompt has a system message
    cannot be written and are left out with a warning (use the trl or ranking format)."""
    snapshot = store.get_snapshot(snapshot_id) if snapshot_id else store.create_snapshot()
    all_pairs = store.pairs(snapshot)
    pairs = [p for p in all_pairs if all(m.role != "system" for m in p.prompt)]
    if len(pairs) < len(all_pairs):
        log.warning("left out %d pairs with system messages: the HH format cannot hold them", len(all_pairs) - len(pairs))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(render_pair(p.prompt, p.chosen, p.rejected), ensure_ascii=False) + "\n")
    return len(pairs), snapshot.snapshot_id
