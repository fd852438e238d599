"""The reward-model registry: versions v1, v2, ... with artifacts, metrics and a status.

A version's artifact directory holds `version.json` (formatting contract, backbone,
normalisation, golden pairs, metrics) and `head.safetensors` (the K score heads), or a
full HF directory for imported checkpoints. Status: candidate -> promoted -> retired, or
rejected by the promotion gate. Exactly one version is promoted at a time.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition, NotFound
from rm_service.models.formatting import FormatSpec
from rm_service.models.runtime import ModelRuntime, load_backbone_runtime
from rm_service.settings import ModelSettings
from rm_service.store.db import Store

log = logging.getLogger(__name__)
STATUSES = ("candidate", "promoted", "rejected", "retired")


@dataclass
class ModelRecord:
    version: str
    parent: str | None
    snapshot_id: str | None
    backbone: str
    format_hash: str
    status: str
    metrics: dict
    reward_mean: float
    reward_std: float
    ensemble_size: int
    artifact_path: str
    created_at_ms: int | None = None


_COLUMNS = "version, parent, snapshot_id, backbone, format_hash, status, metrics, reward_mean, reward_std, ensemble_size, artifact_path, epoch_ms(created_at)"


def _record(row) -> ModelRecord:
    rec = ModelRecord(*row)
    rec.metrics = json.loads(rec.metrics) if isinstance(rec.metrics, str) else (rec.metrics or {})
    return rec


def list_models(store: Store) -> list[ModelRecord]:
    with store._lock:
        rows = store.con.execute(f"SELECT {_COLUMNS} FROM models ORDER BY number").fetchall()
    return [_record(r) for r in rows]


def get_model(store: Store, version: str) -> ModelRecord:
    with store._lock:
        row = store.con.execute(f"SELECT {_COLUMNS} FROM models WHERE version = ?", [version]).fetchone()
    if row is None:
        raise NotFound(f"model version {version!r} not found")
    return _record(row)


def promoted(store: Store) -> ModelRecord | None:
    with store._lock:
        row = store.con.execute(f"SELECT {_COLUMNS} FROM models WHERE status = 'promoted'").fetchone()
    return _record(row) if row else None


def next_version(store: Store) -> tuple[str, int]:
    with store._lock:
        number = store.con.execute("SELECT coalesce(max(number), 0) + 1 FROM models").fetchone()[0]
    return f"v{number}", int(number)


def register(store: Store, rec: ModelRecord, number: int) -> None:
    with store._lock:
        store.con.execute(
            """INSERT INTO models (version, number, parent, snapshot_id, backbone, format_hash, status, metrics,
                                   reward_mean, reward_std, ensemble_size, artifact_path)
               VALUES (?, ?, ?, ?, ?, ?, 'candidate', ?, ?, ?, ?, ?)""",
            [rec.version, number, rec.parent, rec.snapshot_id, rec.backbone, rec.format_hash, json.dumps(rec.metrics),
             rec.reward_mean, rec.reward_std, rec.ensemble_size, rec.artifact_path],
        )


def promote(store: Store, version: str, tolerance: float, force: bool = False) -> tuple[bool, str]:
    """Promotion gate: promote `version` unless its held-out accuracy is below the promoted
    version's by more than `tolerance`. When the candidate was trained with the promoted
    version as parent, the comparison uses the promoted version's accuracy on the candidate's
    own held-out pairs (`baseline_accuracy`), like with like. Returns (promoted?, reason). A refused candidate
    becomes `rejected`; the previously promoted version becomes `retired`."""
    candidate = get_model(store, version)
    current = promoted(store)
    if current is not None and current.version == version:
        return True, f"{version} is already promoted"
    acc_new = candidate.metrics.get("accuracy", float("nan"))
    if current is not None and not force:
        acc_old, where = current.metrics.get("accuracy", float("nan")), "its own held-out pairs"
        if candidate.parent == current.version and "baseline_accuracy" in candidate.metrics:
            acc_old, where = candidate.metrics["baseline_accuracy"], "the candidate's held-out pairs"
        if math.isnan(acc_new) or (not math.isnan(acc_old) and acc_new < acc_old - tolerance):
            _set_status(store, version, "rejected")
            return False, (f"{version} held-out accuracy {acc_new:.4f} is below {current.version}'s {acc_old:.4f} (on {where}) "
                           f"minus tolerance {tolerance}")
    with store.transaction() as con:
        con.execute("UPDATE models SET status = 'retired' WHERE status = 'promoted'")
        con.execute("UPDATE models SET status = 'promoted', promoted_at = now() WHERE version = ?", [version])
    write_promoted_pointer(candidate)
    return True, f"{version} promoted" + (f" (replacing {current.version})" if current else "")


POINTER = "promoted.json"


def write_promoted_pointer(rec: ModelRecord) -> None:
    """`<artifacts dir>/promoted.json`: how scorers without the store (scale-out replicas)
    learn of a promotion. Written atomically (temp file + rename)."""
    directory = Path(rec.artifact_path).parent
    tmp = directory / f".{POINTER}.tmp"
    tmp.write_text(json.dumps({"version": rec.version, "artifact_path": rec.artifact_path}))
    tmp.replace(directory / POINTER)


def read_promoted_pointer(artifacts_dir: Path, strict: bool = False) -> dict | None:
    """The pointer {version, artifact_path}; None when there is none. A pointer that cannot be
    read or is not one is None too, unless `strict`: then FailedPrecondition naming the file."""
    path = Path(artifacts_dir) / POINTER
    try:
        pointer = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(pointer, dict) or not all(isinstance(pointer.get(k), str) for k in ("version", "artifact_path")):
            raise ValueError("not an object with the string keys version and artifact_path")
        return pointer
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON, not a pointer
        if strict:
            raise FailedPrecondition(f"cannot read the registry's {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return None


_META_KEYS = ("version", "backbone", "backbone_key", "format", "format_hash", "reward_mean", "reward_std", "ensemble_size")


def read_version_meta(directory: str | Path) -> dict:
    """A version's version.json; NotFound without one, FailedPrecondition naming the file when
    it cannot be read or lacks what loading needs."""
    path = Path(directory) / "version.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"no model version at {directory} (no version.json)") from None
    except (OSError, ValueError) as exc:  # unreadable (a directory, permissions), not UTF-8, not JSON
        raise FailedPrecondition(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise FailedPrecondition(f"{path} is not a version record: it lacks {', '.join(missing)}")
    return meta


def rollback(store: Store) -> str:
    """Promote again the version promoted before the current one; the current one is retired."""
    current = promoted(store)
    if current is None:
        raise FailedPrecondition("no promoted version to roll back from")
    with store._lock:
        row = store.con.execute(
            "SELECT version FROM models WHERE status = 'retired' AND promoted_at IS NOT NULL ORDER BY promoted_at DESC LIMIT 1"
        ).fetchone()
    if row is None:
        raise FailedPrecondition(f"{current.version} is the only version ever promoted; nothing to roll back to")
    with store.transaction() as con:
        con.execute("UPDATE models SET status = 'retired' WHERE version = ?", [current.version])
        con.execute("UPDATE models SET status = 'promoted', promoted_at = now() WHERE version = ?", [row[0]])
    write_promoted_pointer(get_model(store, row[0]))
    return f"rolled back from {current.version} to {row[0]}"


def _set_status(store: Store, version: str, status: str) -> None:
    with store._lock:
        store.con.execute("UPDATE models SET status = ? WHERE version = ?", [status, version])


def write_head_artifact(directory: Path, meta: dict, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write a head-mode version: version.json + head.safetensors, atomically (temp + rename)."""
    tmp = directory.with_name(directory.name + ".tmp")  # may already hold ./backbone (full mode)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.from_numpy(np.ascontiguousarray(weight)).float(), "bias": torch.from_numpy(np.ascontiguousarray(bias)).float()},
              str(tmp / "head.safetensors"))
    (tmp / "version.json").write_text(json.dumps(meta, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_artifact(directory: str | Path, device: str = "auto", settings: ModelSettings | None = None) -> tuple[ModelRuntime, dict]:
    """Load a version's artifact into a runtime; checks the backbone identity and the golden pairs."""
    directory = Path(directory)
    meta = read_version_meta(directory)
    spec = FormatSpec(**meta["format"])
    backbone = meta["backbone"]
    if backbone.startswith("./"):  # a fine-tuned backbone stored inside the version
        backbone = str(directory / backbone[2:])
    runtime = load_backbone_runtime(backbone, spec.max_tokens, device=device, precision="bf16" if meta.get("autocast_bf16") else "fp32",
                                    settings=settings, spec=spec, identity=meta["backbone"])
    if runtime.backbone_key != meta["backbone_key"]:
        raise FailedPrecondition(f"{directory}: backbone {meta['backbone']!r} is {runtime.backbone_key}, "
                                 f"but the version was trained on {meta['backbone_key']}")
    head = load_file(str(directory / "head.safetensors"))
    score = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0], bias=True)
    with torch.no_grad():
        score.weight.copy_(head["weight"])
        score.bias.copy_(head["bias"])
    runtime.model.score = score.to(runtime.device)
    runtime.model.pooling = meta.get("pooling", runtime.model.pooling)
    runtime.reward_mean, runtime.reward_std = float(meta["reward_mean"]), float(meta["reward_std"])
    check_golden(runtime, meta.get("golden", []), meta.get("golden_tolerance", 0.05), directory)
    return runtime, meta


def check_golden(runtime: ModelRuntime, golden: list[dict], tolerance: float, where: Path | str, scorer=None,
                 cause: str = "the backbone, tokenizer or formatting differs from training") -> None:
    """Re-score the stored golden items (formatted by `runtime`, run by `scorer`, default the
    runtime itself); refuse the version if any score moved beyond tolerance."""
    if not golden:
        return
    items = [runtime.format([Message(**m) for m in g["prompt"]], g["completion"]) for g in golden]
    raw = (scorer or runtime).run(items, max_batch_tokens=1).mean(axis=1)  # one item per batch, as at training
    for g, got in zip(golden, raw):
        if abs(float(got) - g["raw_score"]) > tolerance * max(1.0, abs(g["raw_score"])):
            raise FailedPrecondition(
                f"{where}: golden pair check failed: an item scored {float(got):.5f} at load but {g['raw_score']:.5f} "
                f"in training; {cause}. Refusing to serve this version"
            )
