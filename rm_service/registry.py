"""The model registry: reward models v1, v2, ... and user models u1, u2, ... with artifacts,
metrics and a status.

The store's `models` table holds each version's record and kind; its artifact directory (see
models.version, usermodel.version) holds what loads it. Status: candidate -> promoted ->
retired, or rejected by the promotion gate or its load check. Exactly one version of each kind
is promoted at a time, and a version is announced as promoted (`promoted.json` in the
directory of its kind's versions) only after it loaded and re-checked its golden items.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from rm_service.errors import FailedPrecondition, NotFound, RMError
from rm_service.store import versions
from rm_service.store.db import Store
from rm_service.store.versions import ModelRecord
from rm_service.train.metrics import worse_by_chance

log = logging.getLogger(__name__)
STATUSES = ("candidate", "promoted", "rejected", "retired")
__all__ = ["ModelRecord", "get_model", "list_models", "next_version", "promote", "promoted", "register", "rollback"]


# Reading and writing version rows is the store's (rm_service.store.versions); the registry
# names them as its callers know them and decides what a promotion needs (below).
list_models = versions.list_versions
promoted = versions.promoted_version
next_version = versions.next_version
register = versions.insert_version


def get_model(store: Store, version: str) -> ModelRecord:
    rec = versions.find_version(store, version)
    if rec is None:
        raise NotFound(f"model version {version!r} not found")
    return rec


def gate(
    candidate: ModelRecord,
    current: ModelRecord,
    tolerance: float,
    onpolicy: bool = True,
    alpha: float = 0.0,
    ties: str = "reject",
) -> str | None:
    """Why `candidate` must not replace `current`, or None when it may.

    Compared on the candidate's own held-out pairs when it was trained with `current` as
    parent (its metrics hold the parent's figures on them, `baseline_*`), else on each one's
    own held-out pairs. Dataset pairs: accuracy may not drop by more than `tolerance`; with
    `alpha` > 0 and the paired counts recorded, a larger drop rejects only when McNemar's exact
    test on those pairs finds it significant at `alpha` (refitting on a few fresh pairs moves a
    handful of a couple of hundred held-out pairs either way).
    On-policy pairs (when the candidate has any): accuracy must rise (with `ties` "lower_loss",
    equal accuracy and a lower loss also pass): a retrain on fresh labels must fit the policy's
    samples better."""
    m = candidate.metrics
    same = candidate.parent == current.version and "baseline_accuracy" in m
    new_h = m.get("accuracy_human", m.get("accuracy", float("nan")))
    old_h = (
        m.get("baseline_accuracy_human", m.get("baseline_accuracy"))
        if same
        else current.metrics.get("accuracy_human", current.metrics.get("accuracy", float("nan")))
    )
    where = "the candidate's held-out pairs" if same else "their own held-out pairs"
    if math.isnan(new_h) or (old_h is not None and not math.isnan(old_h) and new_h < old_h - tolerance):
        chance = _drop_by_chance(m) if same and alpha > 0 else None
        if chance is None or chance < alpha:
            test = "" if chance is None else f"; McNemar p = {chance:.3f} < {alpha}"
            return (
                f"{candidate.version} held-out accuracy {new_h:.4f} on dataset pairs is below {current.version}'s {old_h:.4f} "
                f"(on {where}) minus tolerance {tolerance}{test}"
            )
    if onpolicy and same and m.get("pairs_onpolicy", 0) > 0 and "baseline_accuracy_onpolicy" in m:
        new_o, old_o = m["accuracy_onpolicy"], m["baseline_accuracy_onpolicy"]
        tie_passes = ties == "lower_loss" and m["loss_onpolicy"] < m["baseline_loss_onpolicy"]
        if new_o < old_o or (new_o == old_o and not tie_passes):
            return (
                f"{candidate.version} does not fit the policy's samples better than {current.version}: on-policy held-out "
                f"accuracy {new_o:.4f} vs {old_o:.4f}, loss {m['loss_onpolicy']:.4f} vs {m['baseline_loss_onpolicy']:.4f} "
                f"({int(m['pairs_onpolicy'])} pairs)"
            )
    return None


def user_gate(candidate: ModelRecord, current: ModelRecord | None, tolerance: float) -> str | None:
    """Why a user model must not be promoted, or None. On its held-out conversations it must
    predict user turns better than the untuned base model (NLL per user-turn token), and not
    worse than the promoted user model measured on the same conversations (`baseline_nll`)
    by more than `tolerance` nats per token."""
    m = candidate.metrics
    nll, base = m.get("nll", float("nan")), m.get("base_nll", float("nan"))
    if math.isnan(nll) or not nll < base:
        return (
            f"{candidate.version} held-out NLL per user-turn token {nll:.4f} is not below the base model's {base:.4f}"
        )
    if current is not None and "baseline_nll" in m and nll > m["baseline_nll"] + tolerance:
        return (
            f"{candidate.version} held-out NLL per user-turn token {nll:.4f} is above {current.version}'s "
            f"{m['baseline_nll']:.4f} on the same conversations plus tolerance {tolerance}"
        )
    return None


def _drop_by_chance(metrics: dict) -> float | None:
    """McNemar's one-sided p for the candidate's drop on held-out dataset pairs (None: not recorded)."""
    if "paired_worse_human" not in metrics:
        return None
    return worse_by_chance(int(metrics["paired_better_human"]), int(metrics["paired_worse_human"]))


def promote(
    store: Store,
    version: str,
    tolerance: float,
    force: bool = False,
    verify=None,
    onpolicy: bool = True,
    alpha: float = 0.0,
    ties: str = "reject",
) -> tuple[bool, str]:
    """Promote `version` when it passes the gate (unless forced) and, before anything is
    announced, `verify(record)` (load it and check its golden items; raises when it cannot
    serve). Returns (promoted?, reason). A refused or broken candidate becomes `rejected`;
    the previously promoted version becomes `retired`."""
    candidate = get_model(store, version)
    current = promoted(store, candidate.kind)
    if current is not None and current.version == version:
        return True, f"{version} is already promoted"
    if candidate.kind == "user" and not force:
        why = user_gate(candidate, current, tolerance)
        if why is not None:
            versions.set_status(store, version, "rejected")
            return False, why
    elif current is not None and not force:
        why = gate(candidate, current, tolerance, onpolicy, alpha, ties)
        if why is not None:
            versions.set_status(store, version, "rejected")
            return False, why
    if verify is not None:
        try:
            verify(candidate)
        except RMError as exc:
            versions.set_status(store, version, "rejected")
            return (
                False,
                f"{version} failed its load check and was rejected; {current.version if current else 'nothing'} stays: {exc}",
            )
    versions.promote_version(store, version)
    write_promoted_pointer(candidate)
    return True, f"{version} promoted" + (f" (replacing {current.version})" if current else "")


def load_check(models=None, device: str = "auto"):
    """`promote`'s verify step: the version loads (as a scorer would: its device, the measured
    precision) and re-scores its golden items."""
    from rm_service.models.version import open_version

    def verify(rec: ModelRecord) -> None:
        open_version(rec.artifact_path, device=device, settings=models)

    return verify


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
        if not isinstance(pointer, dict) or not all(
            isinstance(pointer.get(k), str) for k in ("version", "artifact_path")
        ):
            raise ValueError("not an object with the string keys version and artifact_path")
        return pointer
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON, not a pointer
        if strict:
            raise FailedPrecondition(
                f"cannot read the registry's {path}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        return None


def rollback(store: Store, kind: str = "reward") -> str:
    """Promote again the version of `kind` promoted before the current one; the current one is retired."""
    current = promoted(store, kind)
    if current is None:
        raise FailedPrecondition(f"no promoted {kind} model to roll back from")
    previous = versions.last_retired_promotion(store, kind)
    if previous is None:
        raise FailedPrecondition(f"{current.version} is the only version ever promoted; nothing to roll back to")
    versions.promote_version(store, previous)  # retires the current one in the same transaction
    write_promoted_pointer(get_model(store, previous))
    return f"rolled back from {current.version} to {previous}"
