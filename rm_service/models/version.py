"""A reward-model version on disk: its typed record (`version.json`) and the one loader.

A version directory holds `version.json` (`VersionMeta`: formatting contract, backbone,
pooling, precision, normalisation, golden items, metrics) and `head.safetensors` (the K
score heads, [K, F] and [K]; and `session_weight`/`session_bias` when the version has a
separate session head, train.feedback); a full-mode version also holds its fine-tuned `./backbone`,
and an exported one `model.onnx`. `open_version` is how evaluation, serving, the judge and
the container load one: the backbone is checked against the recorded identity, and the
golden items are re-scored in the precision the version will run in and compared with
the score recorded for that precision at training (`precision.GOLDEN_TOLERANCE`); a version
that fails is refused, never served (with precision auto, one that fails in bf16 is tried in
fp32: the fastest precision that passes serves).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition, NotFound
from rm_service.models.formatting import FormatSpec
from rm_service.models.pooling import Pooling, legacy_pooling
from rm_service.models.precision import GOLDEN_TOLERANCE
from rm_service.models.runtime import ModelRuntime, load_backbone_runtime
from rm_service.settings import ModelSettings

log = logging.getLogger(__name__)

META_FILE = "version.json"
HEAD_FILE = "head.safetensors"


class Golden(BaseModel):
    """An item and its raw score at training, per precision it was scored in."""

    prompt: list[dict[str, str]]
    completion: str
    raw_score: float  # in the training precision
    raw_scores: dict[str, float] = Field(default_factory=dict)  # "fp32" / "bf16" -> score

    def expected(self, precision: str) -> float:
        return self.raw_scores.get(precision, self.raw_score)


class VersionMeta(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")  # an undefined metric (NaN) survives the round trip

    version: str
    mode: Literal["head", "full"]
    backbone: str  # bundled name, HF directory, or "./backbone" inside the version
    base_backbone: str
    backbone_key: str
    format: FormatSpec
    format_hash: str
    precision: str = "fp32"  # what training ran in
    pooling: Pooling = Field(default_factory=Pooling)
    ensemble_size: int
    reward_mean: float
    reward_std: float
    metrics: dict[str, float] = Field(default_factory=dict)
    snapshot_id: str | None = None
    parent: str | None = None
    settings: dict = Field(default_factory=dict)
    golden: list[Golden] = Field(default_factory=list)
    onnx: dict | None = None
    info: dict = Field(default_factory=dict)  # e.g. head mode's feature selection table

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data):
        """Records written before precision and layered poolings: autocast_bf16, pooling by name."""
        if isinstance(data, dict):
            data = dict(data)
            if "autocast_bf16" in data:
                data.setdefault("precision", "bf16" if data.pop("autocast_bf16") else "fp32")
            if isinstance(data.get("pooling"), str):
                data["pooling"] = legacy_pooling(data["pooling"])
            data.pop("golden_tolerance", None)
            data.setdefault("base_backbone", data.get("backbone", ""))
        return data

    def backbone_dir(self, directory: Path) -> str:
        """The backbone to load: a fine-tuned one inside the version, or the named one."""
        return str(directory / self.backbone[2:]) if self.backbone.startswith("./") else self.backbone


def is_version_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(directory: str | Path) -> VersionMeta:
    path = Path(directory) / META_FILE
    try:
        return VersionMeta.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"no model version at {directory} (no {META_FILE})") from None
    except OSError as exc:  # a directory, no permission
        raise FailedPrecondition(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValidationError as exc:  # not JSON, or not a version record: one line naming what is wrong
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()[:5])
        raise FailedPrecondition(f"{path} is not a valid version record: {problems}") from None
    except ValueError as exc:  # not UTF-8
        raise FailedPrecondition(f"{path} is not a valid version record: {exc}") from None


def write_version(
    directory: Path,
    meta: VersionMeta,
    weight: np.ndarray,
    bias: np.ndarray,
    session: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """version.json + head.safetensors ([K, F], [K], and the session head's when given),
    atomically: written to `<dir>.tmp` (which may already hold ./backbone and ONNX files) and renamed."""
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": weight, "bias": bias}
    if session is not None:
        tensors.update(session_weight=session[0], session_bias=session[1])
    save_file(
        {name: torch.from_numpy(np.ascontiguousarray(t)).float() for name, t in tensors.items()}, str(tmp / HEAD_FILE)
    )
    (tmp / META_FILE).write_text(meta.model_dump_json(indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def read_head(directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    head = load_file(str(Path(directory) / HEAD_FILE))
    return head["weight"].numpy(), head["bias"].numpy()


def read_session_head(directory: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The version's separate session head ([K, F], [K]), or None (its session value sums the turn rewards)."""
    head = load_file(str(Path(directory) / HEAD_FILE))
    return (head["session_weight"].numpy(), head["session_bias"].numpy()) if "session_weight" in head else None


def linear(weight: np.ndarray, bias: np.ndarray, device) -> torch.nn.Linear:
    """A linear layer holding heads ([K, F], [K]) on `device`."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer.to(device)


def open_version(
    directory: str | Path,
    device: str = "auto",
    precision: str = "auto",
    settings: ModelSettings | None = None,
    serving: bool = False,
) -> tuple[ModelRuntime, VersionMeta]:
    """Load a version to run: backbone (cut for its pooling), heads, normalisation; the
    backbone identity and the golden items are checked. `serving`: one copy of the weights,
    in the served precision, from the start (ModelRuntime.serve_only; the golden items are
    scored by that copy: the same computation as a bf16 inference copy)."""
    directory = Path(directory)
    meta = read_meta(directory)
    runtime = load_backbone_runtime(
        meta.backbone_dir(directory),
        meta.format.max_tokens,
        device=device,
        precision=precision,
        settings=settings,
        spec=meta.format,
        identity=meta.backbone,
        pooling=meta.pooling,
        serving=serving,
    )
    if runtime.backbone_key != meta.backbone_key:
        raise FailedPrecondition(
            f"{directory}: backbone {meta.backbone!r} is {runtime.backbone_key}, "
            f"but the version was trained on {meta.backbone_key}"
        )
    runtime.model.score = linear(*read_head(directory), runtime.device)
    session = read_session_head(directory)
    runtime.model.session = linear(*session, runtime.device) if session is not None else None
    runtime.reward_mean, runtime.reward_std = meta.reward_mean, meta.reward_std
    try:
        check_golden(runtime, meta.golden, directory)
    except FailedPrecondition as exc:  # auto serves the fastest precision that passes: fp32 if bf16 fails
        if precision != "auto" or runtime.precision == "fp32":
            raise
        log.warning("%s; precision auto: trying fp32, where its golden items are checked again", exc)
        return open_version(directory, device, "fp32", settings, serving)
    return runtime, meta


def check_golden(
    runtime: ModelRuntime,
    golden: list[Golden],
    where: Path | str,
    scorer=None,
    precision: str | None = None,
    cause: str = "the backbone, tokenizer, formatting or precision differs from training",
) -> None:
    """Re-score the golden items (formatted by `runtime`, run by `scorer`, default the runtime
    itself, in `precision`, default the runtime's) and refuse the version if any moved beyond
    that precision's tolerance."""
    if not golden:
        return
    precision = precision or runtime.precision
    tolerance = GOLDEN_TOLERANCE[precision]
    items = [runtime.format([Message(**m) for m in g.prompt], g.completion) for g in golden]
    raw = (scorer or runtime).run(items, max_batch_tokens=1).mean(axis=1)  # one item per batch, as at training
    for g, got in zip(golden, raw, strict=True):
        want = g.expected(precision)
        if abs(float(got) - want) > tolerance * max(1.0, abs(want)):
            raise FailedPrecondition(
                f"{where}: golden pair check failed: an item scored {float(got):.5f} in {precision} at load but "
                f"{want:.5f} in training (tolerance {tolerance:g}); {cause}. Refusing to serve this version"
            )


def golden_items(runtime: ModelRuntime, prompts_and_completions: list[tuple[list[Message], str]]) -> list[Golden]:
    """Golden items with their scores now in every precision the device runs, one item per
    batch (as the load check scores them)."""
    items = [runtime.format(p, c) for p, c in prompts_and_completions]
    scores = {p: runtime.to_precision(p).run(items, max_batch_tokens=1).mean(axis=1) for p in ("fp32", "bf16")}
    return [
        Golden(
            prompt=[m.as_dict() for m in p],
            completion=c,
            raw_score=float(scores[runtime.precision][i]),
            raw_scores={k: float(v[i]) for k, v in scores.items()},
        )
        for i, (p, c) in enumerate(prompts_and_completions)
    ]


def open_model(
    name: str,
    device: str = "auto",
    precision: str = "auto",
    settings: ModelSettings | None = None,
    max_tokens: int = 1024,
    serving: bool = False,
) -> tuple[ModelRuntime, VersionMeta | None]:
    """A model by any name a user gives, and its version record when it is a version:
    a registry version's name (in the artifacts directory), a version directory, a reward
    checkpoint from elsewhere (`*ForSequenceClassification`, served as it was trained), or a
    bundled name / HF backbone directory (with an untrained head). `serving`: one copy of the
    weights, in the served precision, from the start (ModelRuntime.serve_only)."""
    from rm_service.models.resolver import resolve
    from rm_service.models.reward_model import is_classifier_checkpoint
    from rm_service.models.runtime import load_checkpoint_runtime

    settings = settings or ModelSettings()
    for directory in (Path(settings.artifacts_dir) / name, Path(name)):
        if is_version_dir(directory):
            return open_version(directory, device, precision, settings, serving=serving)
    if is_classifier_checkpoint(resolve(name, settings)):
        return load_checkpoint_runtime(name, max_tokens, device, precision, settings, serving=serving), None
    runtime = load_backbone_runtime(
        name, max_tokens, device=device, precision=precision, settings=settings, serving=serving
    )
    return runtime, None
