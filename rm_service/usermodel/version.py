"""A user-model version on disk, its golden items, and the one loader.

A version directory (`<artifacts>/user/u<N>`) holds `user.json` (UserVersionMeta: formatting
contract, base backbone, method, precision, metrics, snapshot, golden items) and `./model`, the
fine-tuned causal LM with its tokenizer (a standard transformers directory, LoRA merged).
`open_user_version` is how evaluation and serving load one: the golden items, a few held-out
conversations with the mean NLL of their learned positions recorded at training in each
precision, are scored again in the precision the version will run in and compared within that
precision's tolerance (models.precision.GOLDEN_TOLERANCE); a version that fails is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition, NotFound
from rm_service.models.precision import GOLDEN_TOLERANCE
from rm_service.settings import ModelSettings
from rm_service.usermodel.format import UserFormat
from rm_service.usermodel.runtime import UserRuntime, load_user_runtime, score

META_FILE = "user.json"
MODEL_DIR = "model"
KIND_DIR = "user"  # user versions live in <artifacts_dir>/user, with their own promoted.json


class UserGolden(BaseModel):
    """A conversation and the mean NLL of its learned positions at training, per precision."""

    messages: list[dict[str, str]]
    ended: bool
    nll: dict[str, float]  # "fp32" / "bf16" -> mean NLL


class UserVersionMeta(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    version: str
    kind: str = "user"
    base_backbone: str
    backbone_key: str
    method: str  # full | lora
    format: UserFormat
    format_hash: str
    precision: str = "fp32"  # what training ran in
    metrics: dict[str, float] = Field(default_factory=dict)
    snapshot_id: str | None = None
    parent: str | None = None
    split: dict = Field(default_factory=dict)  # the held-out split it shares with the reward model
    settings: dict = Field(default_factory=dict)
    golden: list[UserGolden] = Field(default_factory=list)


def versions_dir(settings: ModelSettings) -> Path:
    return Path(settings.artifacts_dir) / KIND_DIR


def is_user_version(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_user_meta(directory: str | Path) -> UserVersionMeta:
    path = Path(directory) / META_FILE
    try:
        return UserVersionMeta.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"no user-model version at {directory} (no {META_FILE})") from None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValidationError, ValueError) as exc:
        raise FailedPrecondition(
            f"{path} is not a valid user-model version record: {str(exc).splitlines()[0]}"
        ) from None


def golden_items(runtime: UserRuntime, conversations: list[tuple[list[Message], bool]]) -> list[UserGolden]:
    """Golden items with their mean NLL now, in both precisions, one conversation per batch."""
    out = []
    for messages, ended in conversations:
        seq = runtime.formatter.windows(messages, ended)[-1:]
        nll = {p: float(np.mean(score(runtime.to_precision(p), seq).nll)) for p in ("fp32", "bf16")}
        out.append(UserGolden(messages=[m.as_dict() for m in messages], ended=ended, nll=nll))
    return out


def check_golden(runtime: UserRuntime, golden: list[UserGolden], where: Path | str) -> None:
    tolerance = GOLDEN_TOLERANCE[runtime.precision]
    for g in golden:
        seq = runtime.formatter.windows([Message(**m) for m in g.messages], g.ended)[-1:]
        got, want = float(np.mean(score(runtime, seq).nll)), g.nll[runtime.precision]
        if abs(got - want) > tolerance * max(1.0, abs(want)):
            raise FailedPrecondition(
                f"{where}: golden item check failed: a conversation's NLL is {got:.5f} in {runtime.precision} at load "
                f"but was {want:.5f} at training (tolerance {tolerance:g}); the model, tokenizer, template or "
                "precision differs from training. Refusing to serve this version"
            )


def write_user_version(directory: Path, meta: UserVersionMeta, runtime: UserRuntime) -> None:
    """user.json and ./model, atomically (written to `<dir>.tmp`, then renamed)."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / MODEL_DIR).mkdir(parents=True)
    runtime.model.save_pretrained(tmp / MODEL_DIR)
    runtime.tokenizer.save_pretrained(tmp / MODEL_DIR)
    (tmp / META_FILE).write_text(meta.model_dump_json(indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def open_user_version(
    directory: str | Path, device: str = "auto", precision: str = "auto", settings: ModelSettings | None = None
) -> tuple[UserRuntime, UserVersionMeta]:
    """Load a user-model version to run; its tokenizer and golden items are checked."""
    directory = Path(directory)
    meta = read_user_meta(directory)
    runtime = load_user_runtime(
        str(directory / MODEL_DIR),
        meta.format.max_tokens,
        device=device,
        precision=precision,
        settings=settings,
        spec=meta.format,
        identity=meta.version,
    )
    from rm_service.models.formatting import tokenizer_fingerprint

    if tokenizer_fingerprint(runtime.tokenizer) != meta.format.tokenizer_fingerprint:
        raise FailedPrecondition(f"{directory}: the tokenizer is not the one the version was trained with")
    check_golden(runtime, meta.golden, directory)
    return runtime, meta


def open_user_model(
    name: str,
    device: str = "auto",
    precision: str = "auto",
    settings: ModelSettings | None = None,
    max_tokens: int = 512,
) -> tuple[UserRuntime, UserVersionMeta | None]:
    """A user model by any name: a user version's name (u3, in the registry's user directory), a
    version directory, or a causal LM (bundled name or HF directory) used untuned."""
    settings = settings or ModelSettings()
    for directory in (versions_dir(settings) / name, Path(name)):
        if is_user_version(directory):
            return open_user_version(directory, device, precision, settings)
    return load_user_runtime(name, max_tokens, device=device, precision=precision, settings=settings), None
