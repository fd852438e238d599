"""The model registry: reward models v1, v2, ... and user models u1, u2, ... with artifacts,
metrics and a status.

The store's `models` table holds each version's record and kind; its artifact directory (see
models.version, usermodel.version) holds what loads it. Status: candidate -> promoted ->
retired, or rejected by the promotion rule (reward models: `decide`: promote, reject, or
undecided, which leaves a candidate; user models: `user_decision`) or its load check. Exactly
one version of each kind is promoted at a time, and a version is announced as promoted
(`promoted.json` in the directory of its kind's versions) only after it loaded and re-checked
its golden items.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rm_service.errors import FailedPrecondition, NotFound, RMError
from rm_service.evidence import Effect
from rm_service.store import versions
from rm_service.store.db import Store
from rm_service.store.versions import ModelRecord

log = logging.getLogger(__name__)
STATUSES = ("candidate", "promoted", "rejected", "retired")
__all__ = [
    "Decision",
    "ModelRecord",
    "decide",
    "get_model",
    "list_models",
    "next_version",
    "promote",
    "promoted",
    "register",
    "rollback",
    "user_decision",
]


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


@dataclass(frozen=True)
class Decision:
    """What the promotion rule answered for a candidate against its parent, and on what.

    verdict: "promote", "reject", or "undecided" (keep collecting labels: the evidence cannot
    tell the two apart yet). `confidence` is the level of every interval in the evidence;
    `pairs_needed` the on-policy pairs (counted from the parent's snapshot on; feedback labels
    when the policy's evidence is feedback alone) the rule expects to need to decide when
    undecided (NaN when decided or unknown). `feedback`: the thumbs and outcomes on the policy's
    sessions (train.feedback_gate), gains per label."""

    verdict: str
    reason: str
    parent: str | None = None
    confidence: float = 0.95
    human: Effect | None = None
    onpolicy: Effect | None = None
    combined: Effect | None = None
    pairs_needed: float = math.nan
    feedback: Effect | None = None

    @property
    def promote(self) -> bool:
        return self.verdict == "promote"

    def to_dict(self) -> dict:
        """JSON-safe (infinite bounds and NaN become null)."""
        return _json_safe({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_dict(cls, d: dict) -> Decision:
        effects = {k: _effect(d[k]) for k in GROUPS if d.get(k)}
        needed = d.get("pairs_needed")
        return cls(
            d["verdict"],
            d["reason"],
            d.get("parent"),
            d.get("confidence", 0.95),
            pairs_needed=math.nan if needed is None else needed,
            **effects,
        )

    def as_metrics(self) -> dict[str, float]:
        """The evidence as numbers for the version's metrics (`gate_human_gain`, ...)."""
        out = {"gate_verdict": float(VERDICTS.index(self.verdict)), "gate_pairs_needed": self.pairs_needed}
        for name in GROUPS:
            e = getattr(self, name)
            if e is not None:
                out.update(e.as_metrics(f"gate_{name}"))
        return out


VERDICTS = ("reject", "undecided", "promote")
GROUPS = ("human", "onpolicy", "feedback", "combined")  # the evidence's groups, as stored and in metrics (gate_*)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _effect(d: dict) -> Effect:
    bounds = {"low": -math.inf, "high": math.inf}
    fields: dict[str, Any] = {k: (bounds.get(k, math.nan) if v is None else v) for k, v in d.items()}
    return Effect(**fields)


def decide(
    human: Effect | None,
    onpolicy: Effect | None,
    combined: Effect | None = None,
    confidence: float = 0.95,
    parent: str | None = None,
    pairs_needed: float = math.nan,
    feedback: Effect | None = None,
) -> Decision:
    """The promotion rule, on paired per-item log-likelihood gains (rm_service.evidence). The
    policy's evidence is its on-policy pairs and the feedback (thumbs, outcomes) on its sessions:

    reject     significantly worse on the policy's pairs or on its feedback; or on the held-out
               human pairs while not significantly better on the policy's evidence;
    promote    significantly better on the human pairs, on the policy's pairs or feedback, or on
               all weighed together (`combined`), and significantly worse on none;
    undecided  anything else: ties on a handful of pairs, or better on the policy's evidence
               but worse on human pairs. A retrain on more labels decides again.
    """
    named = (("human pairs", human), ("the policy's samples", onpolicy), ("feedback on its sessions", feedback))
    groups = [(n, e) for n, e in named if e is not None]
    evidence = "; ".join(f"{n} {e.text('label' if e is feedback else 'pair')}" for n, e in groups)
    evidence = evidence or "no held-out pairs"
    if combined is not None:
        evidence += f"; weighed together {combined.gain:+.4f} [{combined.low:+.4f}, {combined.high:+.4f}]"

    def verdict(kind: str, why: str) -> Decision:
        reason = f"{why} (intervals at {confidence:.0%}): {evidence}"
        return Decision(kind, reason, parent, confidence, human, onpolicy, combined, pairs_needed, feedback)

    worse_h, better_h = bool(human and human.worse), bool(human and human.better)
    policy = [(n, e) for n, e in named[1:] if e is not None]  # the policy's pairs and feedback
    worse = [n for n, e in policy if e.worse]
    better = [n for n, e in policy if e.better]
    worse_o, better_o = bool(worse), bool(better)
    if worse_o:
        return verdict("reject", f"worse than its parent on {' and '.join(worse)}")
    if worse_h and not better_o:
        return verdict("reject", "worse than its parent on held-out human pairs")
    if worse_h:
        return verdict("undecided", f"better on {' and '.join(better)} but worse on human pairs")
    if better_h or better_o or (combined is not None and combined.better):
        where = " and ".join((["human pairs"] if better_h else []) + better) or "all weighed together"
        return verdict("promote", f"better than its parent on {where} and worse on none")
    return verdict("undecided", "not distinguishable from its parent yet")


def user_decision(candidate: ModelRecord, current: ModelRecord | None, tolerance: float) -> Decision:
    """The promotion rule of user models: on its held-out conversations the candidate must
    predict user turns better than the untuned base model (NLL per user-turn token, `nll` <
    `base_nll`), and not worse than the promoted user model measured on the same conversations
    (`baseline_nll`) by more than `tolerance` nats per token."""
    m, parent = candidate.metrics, current.version if current is not None else None
    nll, base = m.get("nll", math.nan), m.get("base_nll", math.nan)
    figures = f"held-out NLL per user-turn token {nll:.4f}, base model {base:.4f}"
    if math.isnan(nll) or not nll < base:
        return Decision("reject", f"not below the base model's NLL: {figures}", parent)
    if current is not None and "baseline_nll" in m:
        figures += f", {current.version} {m['baseline_nll']:.4f} on the same conversations"
        if nll > m["baseline_nll"] + tolerance:
            return Decision("reject", f"above {current.version}'s NLL plus tolerance {tolerance}: {figures}", parent)
    return Decision("promote", f"below the base model's NLL and not above the promoted one's: {figures}", parent)


def promote(
    store: Store, version: str, decision: Decision | None = None, force: bool = False, verify=None
) -> tuple[bool, str]:
    """Promote `version` when `decision` says so (or when forced, or nothing is promoted yet)
    and, before anything is announced, `verify(record)` (load it and check its golden items;
    raises when it cannot serve). Returns (promoted?, reason). A rejected or broken candidate
    becomes `rejected`, an undecided one stays a candidate; the previously promoted version
    becomes `retired`. (The training run records the decision on the version.)"""
    candidate = get_model(store, version)
    current = promoted(store, candidate.kind)
    if current is not None and current.version == version:
        return True, f"{version} is already promoted"
    if (current is not None or candidate.kind == "user") and not force:  # a user model must beat its base
        if decision is None:
            against = current.version if current is not None else "its base model"
            return False, f"{version} has no decision against {against}: retrain it, or promote with force"
        if not decision.promote:
            if decision.verdict == "reject":
                versions.set_status(store, version, "rejected")
            return False, f"{version} {decision.verdict}: {decision.reason}"
    if verify is not None:
        try:
            verify(candidate)
        except RMError as exc:
            versions.set_status(store, version, "rejected")
            stays = current.version if current else "nothing"
            return False, f"{version} failed its load check and was rejected; {stays} stays: {exc}"
    versions.promote_version(store, version)
    write_promoted_pointer(candidate)
    return True, f"{version} promoted" + (f" (replacing {current.version})" if current else "")


def stored_decision(store: Store, version: str) -> Decision | None:
    """The decision recorded on `version`, if it was made against the version promoted now
    (None otherwise: evidence against another parent says nothing about this one)."""
    d, current = get_model(store, version).decision, promoted(store)
    if not d or current is None or d.get("parent") != current.version:
        return None
    return Decision.from_dict(d)


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
