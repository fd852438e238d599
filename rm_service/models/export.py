"""A version as a standard transformers `*ForSequenceClassification` directory, for tools that
know nothing of rm-service (TRL, vLLM, TEI, plain transformers).

What a standard decoder classifier computes: the backbone's final (normed) output at the last
token that is not padding, times one bias-free linear row. A version maps onto that exactly when

- its backbone is a decoder (encoder classifiers read `[CLS]` through their own pooler, which
  rm-service's token means cannot become);
- its pooling reads the last token of the backbone's final output: `last@out` or `last@N`
  with N the backbone's depth (a middle layer's states are not normed, and a model cut after
  that layer would norm them: not the same numbers; a completion mean has no counterpart);
- the ensemble mean's bias is zero (full mode trains bias-free heads), or the backbone's final
  norm has a bias to fold it into (LayerNorm: GPT-2, GPT-NeoX, OPT, Phi; RMSNorm, as in Llama,
  Qwen and SmolLM2, has none: head mode's centring bias cannot be expressed there).

The ensemble's K linear heads fold into their mean (the served score is the mean of K linear
functions of the same features, itself one). `export_hf` refuses anything else with
InvalidArgument saying why and which training settings give an exportable version, and checks
what it wrote: transformers' own class, loaded back from the directory, must score built-in
and golden items (one at a time and in one right-padded batch) as the version scores them in
fp32, within EXPORT_TOLERANCE, or nothing is left behind.

The directory also holds `rm_service.json`: the formatting contract (the chat template renders
prompt + completion as the last assistant turn, trailing whitespace stripped, EOS appended,
the conversation's start cut beyond max_tokens) and the version's reward_mean/reward_std, which
turn the raw score into the reward the server serves.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.models.batching import collate
from rm_service.models.resolver import resolve
from rm_service.models.runtime import PARITY_ITEMS, ModelRuntime
from rm_service.models.version import VersionMeta, open_version, read_meta
from rm_service.settings import ModelSettings

EXPORT_TOLERANCE = 1e-4  # relative (to max(1, |score|)), fp32
EXPORT_META = "rm_service.json"
EXPORTABLE = (
    "train a decoder backbone in full mode (rm-service train --mode full: bias-free heads on the last token of the "
    "final layer), or in head mode with --feature-layers last on a backbone whose final norm has a bias (GPT-2 "
    "family), when cross-validation picks the last token"
)
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass
class Exported:
    directory: Path
    architecture: str
    version: str
    max_difference: float  # worst relative difference from the served scores over the checked items
    items_checked: int

    def summary(self) -> str:
        return (
            f"exported {self.version} to {self.directory} as {self.architecture}: {self.items_checked} items score "
            f"as served (max relative difference {self.max_difference:.2g})"
        )


def version_dir(version: str | Path, settings: ModelSettings | None = None) -> Path:
    """A registry version's directory (by name, in the artifacts directory) or a version directory."""
    settings = settings or ModelSettings()
    named = Path(settings.artifacts_dir) / str(version)
    return named if (named / "version.json").is_file() else Path(version)


def check_exportable(meta: VersionMeta, num_layers: int) -> None:
    """InvalidArgument unless the version's formatting and pooling fit a standard classifier."""
    why = None
    if meta.format.kind != "causal":
        why = (
            "its backbone is an encoder: a standard encoder classifier scores the [CLS] token through its own "
            f"pooler, and this version pools {meta.pooling.name}"
        )
    elif meta.format.style != "rm_service":
        why = f"its formatting style is {meta.format.style!r}; only versions rm-service trained are exported"
    elif meta.pooling.method != "last":
        why = (
            f"it pools {meta.pooling.name}: a standard classifier reads one token, the last, and has no completion "
            "mean (head mode chose this by cross-validation)"
        )
    elif meta.pooling.layers not in ((), (num_layers,)):
        why = (
            f"its features are layer {'+'.join(map(str, meta.pooling.layers))} of {num_layers}: a middle layer's "
            "states are not normed, and a model cut after it would apply the final norm, which changes the scores"
        )
    if why:
        raise InvalidArgument(
            "version",
            f"{meta.version} cannot be exported as a standard *ForSequenceClassification: {why}. "
            f"To get an exportable version, {EXPORTABLE}",
        )


def export_hf(version: str | Path, out_dir: str | Path, settings: ModelSettings | None = None) -> Exported:
    """Write `version` as a transformers *ForSequenceClassification directory at `out_dir`
    (which must not exist, or be empty), checked to score as the version does."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    directory = version_dir(version, settings)
    meta = read_meta(directory)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument("dir", f"{out} exists and is not an empty directory")
    config = AutoConfig.from_pretrained(resolve(meta.backbone_dir(directory), settings))
    check_exportable(meta, int(config.num_hidden_layers))  # before loading anything heavy
    runtime, meta = open_version(directory, device="cpu", precision="fp32", settings=settings)
    backbone = runtime.model.backbone
    config.num_labels, config.id2label, config.label2id = 1, {0: "reward"}, {"reward": 0}
    config.pad_token_id = export_pad_id(runtime)
    try:
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except ValueError as exc:
        raise InvalidArgument(
            "version", f"{meta.version}: transformers has no sequence classifier for {config.model_type!r}: {exc}"
        ) from None
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise InvalidArgument(
            "version",
            f"{meta.version}: {type(model).__name__} does not score with one linear row over the last "
            f"token; to get an exportable version, {EXPORTABLE}",
        )
    missing, unexpected = model.base_model.load_state_dict(backbone.state_dict(), strict=False)
    if missing or unexpected:
        raise InvalidArgument(
            "version",
            f"{meta.version}: the backbone's weights do not fit {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
        )
    weight = runtime.model.score.weight.detach().float().mean(dim=0, keepdim=True)  # [K, F] -> [1, F]
    bias = float(runtime.model.score.bias.detach().float().mean()) if runtime.model.score.bias is not None else 0.0
    with torch.no_grad():
        head.weight.copy_(weight)
        fold_bias(model, weight[0], bias, meta.version)
    model.eval()
    return _write_checked(model, runtime, meta, out)


def export_pad_id(runtime: ModelRuntime) -> int:
    """The pad id the exported classifier looks for: transformers reads the score at the last
    token that is not this id, so it must not be the EOS that ends every item."""
    tok, pad = runtime.tokenizer, runtime.pad_id
    if pad != tok.eos_token_id:
        return pad
    template = runtime.spec.chat_template or ""
    # One the template never writes first.
    others = sorted(
        (i for i in tok.all_special_ids if i != tok.eos_token_id),
        key=lambda i: tok.convert_ids_to_tokens(i) in template,
    )
    if not others:
        raise InvalidArgument(
            "version",
            "the tokenizer pads with its EOS and has no other special token to pad with; "
            "transformers would read the score before the EOS that ends every item",
        )
    return others[0]


def fold_bias(model: torch.nn.Module, weight: torch.Tensor, bias: float, version: str) -> None:
    """Add `bias` to the score through the final norm's bias (score = w . (norm(x) + beta)): beta
    grows by bias * w / |w|^2. InvalidArgument when the bias is not zero and the norm has none."""
    if bias == 0.0:
        return
    base = model.base_model
    norm = next((getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), torch.nn.Module)), None)
    beta = getattr(norm, "bias", None) if norm is not None else None
    if not isinstance(beta, torch.nn.Parameter) or float(weight @ weight) == 0.0:
        raise InvalidArgument(
            "version",
            f"{version} cannot be exported as a standard *ForSequenceClassification: its heads have a "
            f"bias ({bias:.4g}; head mode centres the rewards with it), a decoder classifier's score "
            f"has none, and the backbone's final norm ({type(norm).__name__}) has no bias to carry it. "
            f"To get an exportable version, {EXPORTABLE}",
        )
    beta.add_(weight * (bias / float(weight @ weight)))


def _check_items(meta: VersionMeta) -> list[tuple[list[Message], str]]:
    golden = [([Message(**m) for m in g.prompt], g.completion) for g in meta.golden]
    return list(PARITY_ITEMS) + golden


@torch.inference_mode()
def compare(
    model: torch.nn.Module, runtime: ModelRuntime, items: list[tuple[list[Message], str]], pad_id: int
) -> float:
    """Worst relative difference between `model`'s scores (one at a time, and in one right-padded
    batch) and the version's served raw scores (fp32, ensemble mean)."""
    formatted = [runtime.format(p, c) for p, c in items]
    served = runtime.to_precision("fp32").run(formatted, max_batch_tokens=1).mean(axis=1)  # [N]
    alone = np.array([float(model(input_ids=torch.tensor([x.input_ids])).logits[0, 0]) for x in formatted])  # [N]
    batch = collate(formatted, pad_id)  # input_ids, attention_mask [N, T]
    batched = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].numpy()  # [N]
    scale = np.maximum(1.0, np.abs(served))
    return float(max(np.max(np.abs(alone - served) / scale), np.max(np.abs(batched - served) / scale)))


def _write_checked(model, runtime: ModelRuntime, meta: VersionMeta, out: Path) -> Exported:
    from transformers import AutoModelForSequenceClassification

    tmp = out.with_name(out.name + ".export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        tokenizer = runtime.tokenizer
        pad_id = model.config.pad_token_id
        if tokenizer.pad_token_id != pad_id:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        tokenizer.chat_template = meta.format.chat_template
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_META).write_text(json.dumps(export_record(meta), indent=2))
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch.float32).eval()
        items = _check_items(meta)
        worst = compare(loaded, runtime, items, pad_id)
        if not worst <= EXPORT_TOLERANCE:
            raise InvalidArgument(
                "version",
                f"{meta.version}: the exported {type(loaded).__name__} scores differ from the version's by "
                f"{worst:.3g} (tolerance {EXPORT_TOLERANCE:g}); nothing was written",
            )
        if out.exists():
            out.rmdir()  # empty, checked above
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Exported(out, type(loaded).__name__, meta.version, worst, len(items))


def export_record(meta: VersionMeta) -> dict:
    """What a user of the directory needs beyond the weights: the formatting and normalisation."""
    return {
        "exported_from": meta.version,
        "mode": meta.mode,
        "base_backbone": meta.base_backbone,
        "formatting": (
            "tokenizer.apply_chat_template(prompt + [{'role': 'assistant', 'content': completion}], tokenize=False), "
            "trailing whitespace stripped, tokenized without special tokens, EOS appended when missing; beyond "
            "max_tokens the start is cut; the score is the logit at the last token"
        ),
        "max_tokens": meta.format.max_tokens,
        "format_hash": meta.format_hash,
        "reward_mean": meta.reward_mean,
        "reward_std": meta.reward_std,
        "normalised_reward": "(logit - reward_mean) / reward_std, as the rm-service server serves it",
        "ensemble_size": meta.ensemble_size,
        "ensemble": "the mean of the version's heads (the served raw score); no uncertainty",
    }
