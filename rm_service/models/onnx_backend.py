"""ONNX export of a whole reward model and an ONNX Runtime CPU backend.

The exported graph is the whole `RewardModel` (backbone + pooling + score heads) in fp32:

    inputs   input_ids         int64 [B, T]
             attention_mask    int64 [B, T]   right padding, as `batching.collate` builds it
             token_type_ids    int64 [B, T]   encoders only
             completion_start  int64 [B]      poolings over the completion's tokens only
    output   rewards         fp32  [B, K]   one column per score head

B and T are dynamic. `OnnxRuntimeModel.run` batches and pads exactly like
`ModelRuntime.run` (token-budget batches, right padding with the runtime's pad id), so the
two backends see the same tensors and can be compared item for item.

An int8 variant is made with ONNX Runtime's dynamic quantisation (int8 weights,
activations quantised per call). It is kept only when it orders (chosen, rejected) pairs
like the fp32 model does: `build_onnx_artifacts` measures that and deletes it otherwise.

The exporter is the TorchScript one (`dynamo=False`): the dynamo exporter needs
`onnxscript`, which is not a dependency. Quantisation needs the `onnx` package.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rm_service.models.batching import collate, token_budget_batches
from rm_service.models.formatting import Formatted
from rm_service.models.quantize import OUTPUT_NAME, quantize_int8
from rm_service.models.reward_model import RewardModel
from rm_service.models.runtime import ModelRuntime

log = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
DEFAULT_RTOL = 1e-4
DEFAULT_BATCH_TOKENS = 4096


class OnnxParityError(RuntimeError):
    """The exported graph's rewards differ from torch's beyond the tolerance."""


# --------------------------------------------------------------------------- export


def input_names(runtime: ModelRuntime) -> list[str]:
    """Graph inputs, in the order `RewardModel.forward` takes them."""
    names = ["input_ids", "attention_mask"]
    if runtime.spec.kind == "encoder":
        names.append("token_type_ids")
    if runtime.model.pooling.needs_completion_start:
        names.append("completion_start")
    return names


def _export_copy(model: RewardModel) -> RewardModel:
    """A CPU fp32 deep copy in eval mode with eager attention and no KV cache.

    The runtime's own model is never touched: it may be serving on another thread.
    """
    clone = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    backbone = clone.backbone
    if hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation("eager")
    else:  # older transformers
        backbone.config._attn_implementation = "eager"
    if hasattr(backbone.config, "use_cache"):
        backbone.config.use_cache = False
    return clone


class _ByName(torch.nn.Module):
    """The model with its inputs taken positionally in the graph's input order (the tracer
    passes positions; RewardModel.forward's optional inputs are keywords)."""

    def __init__(self, model: RewardModel, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True)))  # [B, K]


def _dummy_inputs(runtime: ModelRuntime, names: list[str]) -> tuple[torch.Tensor, ...]:
    """A right-padded batch of two rows of different lengths, [2, 8].

    Tracing runs the masking code with real padding, so no branch that skips the padding
    mask (taken when a batch has none) is frozen into the graph.
    """
    vocab = int(runtime.model.backbone.config.vocab_size)
    lengths = (8, 5)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), runtime.pad_id, dtype=torch.long)  # [2, 8]
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)  # [2, 8]
    token_type_ids = torch.zeros((len(lengths), width), dtype=torch.long)  # [2, 8]
    for row, n in enumerate(lengths):
        input_ids[row, :n] = (torch.arange(n) * 7 + 3) % vocab
        attention_mask[row, :n] = 1
        token_type_ids[row, n // 2 : n] = 1
    completion_start = torch.tensor([3, 2], dtype=torch.long)  # [2]
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "completion_start": completion_start,
    }
    return tuple(tensors[name] for name in names)


def export_onnx(runtime: ModelRuntime, path: Path, opset: int = 17) -> Path:
    """Export `runtime.model` (backbone + pooling + score heads) in fp32 to `path`.

    Inputs `input_ids`, `attention_mask` (and `token_type_ids` for encoders), [B, T] with
    dynamic B and T; output `rewards` [B, K]. Exported on CPU from a deep copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = input_names(runtime)
    model = _ByName(_export_copy(runtime.model), names)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} if name != "completion_start" else {0: "batch"} for name in names}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # Last-token pooling indexes with attention_mask.sum - 1 >= 0: collate never builds an empty row.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            model,
            _dummy_inputs(runtime, names),
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    log.info("exported %s (%s, opset %d) to %s", runtime.backbone, runtime.spec.kind, opset, path)
    return path


# --------------------------------------------------------------------------- ONNX Runtime backend


def session_options(threads: int | None = None):
    """CPU session options: all cores intra-op, one inter-op thread, no spinning, full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads sleep instead of spinning: a server shares the cores with gRPC.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeModel:
    """An exported reward model run by ONNX Runtime on CPU; batches like `ModelRuntime.run`."""

    def __init__(self, path: str | Path, pad_id: int, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.pad_id = pad_id
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    @classmethod
    def for_runtime(cls, runtime: ModelRuntime, path: str | Path, threads: int | None = None) -> OnnxRuntimeModel:
        """Open `path` with the runtime's pad id (so padding matches the torch path)."""
        return cls(path, runtime.pad_id, threads)

    def _feeds(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise ValueError(f"{self.path}: the graph needs {missing}, which the formatted items do not carry")
        return {name: batch[name].numpy() for name in self.input_names}  # each [b, T] int64

    def run_collated(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Member rewards [b, K] of one padded batch (the server's batcher calls this)."""
        return self.session.run([OUTPUT_NAME], self._feeds(batch))[0]

    def run(self, items: list[Formatted], max_batch_tokens: int) -> np.ndarray:
        """Member rewards [N, K] of `items`, in the order given."""
        out: np.ndarray | None = None
        for batch_idx in token_budget_batches([len(x) for x in items], max_batch_tokens):
            batch = collate([items[i] for i in batch_idx], self.pad_id)  # [b, T] tensors
            values = self.session.run([OUTPUT_NAME], self._feeds(batch))[0]  # [b, K]
            if out is None:
                out = np.zeros((len(items), values.shape[1]), dtype=np.float32)
            out[batch_idx] = values
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# --------------------------------------------------------------------------- checks


def max_relative_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """max |a - b| / max(1, |a|) over all entries, a from `reference`."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(a))).max())


def _parity_report(reference: np.ndarray, other: np.ndarray, rtol: float) -> dict:
    rel = max_relative_difference(reference, other)
    abs_diff = float(np.abs(reference.astype(np.float64) - other).max()) if reference.size else 0.0
    return {
        "items": int(reference.shape[0]),
        "max_rel_diff": rel,
        "max_abs_diff": abs_diff,
        "rtol": rtol,
        "ok": rel <= rtol,
    }


def parity(
    runtime: ModelRuntime,
    onnx_model: OnnxRuntimeModel,
    items: list[Formatted],
    rtol: float = DEFAULT_RTOL,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> dict:
    """Torch (`runtime.run`) vs ONNX Runtime rewards on the same items and batches.

    Returns {"items", "max_rel_diff", "max_abs_diff", "rtol", "ok"}; relative difference is
    |a - b| / max(1, |a|) with a the torch reward. The runtime runs at its own precision, so
    compare against an fp32 runtime.
    """
    reference = runtime.run(items, max_batch_tokens)  # [N, K]
    return _parity_report(reference, onnx_model.run(items, max_batch_tokens), rtol)


def _served(rewards: np.ndarray) -> np.ndarray:
    """The served score: [N] as is, [N, K] -> mean over members [N]."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return rewards.mean(axis=1) if rewards.ndim == 2 else rewards


def ordering_agreement(r_chosen_a, r_rejected_a, r_chosen_b, r_rejected_b) -> float:
    """Fraction of pairs where sign(r_chosen - r_rejected) is the same under models a and b.

    Each argument is [N] or [N, K] (reduced to the served mean over the K members).
    """
    diff_a = _served(r_chosen_a) - _served(r_rejected_a)  # [N]
    diff_b = _served(r_chosen_b) - _served(r_rejected_b)  # [N]
    if diff_a.shape != diff_b.shape or diff_a.ndim != 1:
        raise ValueError(f"pair rewards must be [N] or [N, K] of one N; got {diff_a.shape} and {diff_b.shape}")
    if diff_a.size == 0:
        raise ValueError("ordering agreement needs at least one pair")
    return float((np.sign(diff_a) == np.sign(diff_b)).mean())


# --------------------------------------------------------------------------- artifacts


def _flatten_pairs(pairs_items: Sequence[tuple[Formatted, Formatted]]) -> list[Formatted]:
    """[(chosen, rejected)] * N -> chosen_0 .. chosen_{N-1}, rejected_0 .. rejected_{N-1}."""
    return [c for c, _ in pairs_items] + [r for _, r in pairs_items]


def build_onnx_artifacts(
    runtime: ModelRuntime,
    out_dir: Path,
    pairs_items: Sequence[tuple[Formatted, Formatted]],
    keep_int8_threshold: float = 0.99,
    rtol: float = DEFAULT_RTOL,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    opset: int = 17,
) -> dict:
    """Export fp32, check parity, quantise to int8 and keep it only if it orders pairs like torch.

    `pairs_items` are (chosen, rejected) formatted items. Parity is checked on all of them
    (raises OnnxParityError above `rtol`); the int8 model's ordering agreement with the
    torch rewards is measured on the pairs, and the int8 file is deleted when the agreement
    is below `keep_int8_threshold`.

    Returns {"fp32_path", "int8_path" (None when deleted), "max_rel_diff", "max_abs_diff",
    "int8_max_rel_diff", "int8_agreement", "int8_kept", "keep_int8_threshold", "pairs"}.
    """
    if not pairs_items:
        raise ValueError("build_onnx_artifacts needs at least one (chosen, rejected) pair")
    out_dir = Path(out_dir)
    n = len(pairs_items)
    items = _flatten_pairs(pairs_items)  # 2N items
    fp32_path = export_onnx(runtime, out_dir / FP32_FILE, opset)

    reference = runtime.run(items, max_batch_tokens)  # [2N, K]
    fp32 = OnnxRuntimeModel.for_runtime(runtime, fp32_path).run(items, max_batch_tokens)  # [2N, K]
    check = _parity_report(reference, fp32, rtol)
    if not check["ok"]:
        raise OnnxParityError(
            f"{fp32_path}: ONNX Runtime rewards differ from torch by {check['max_rel_diff']:.3g} "
            f"(relative, |a-b|/max(1,|a|)) on {check['items']} items; the tolerance is {rtol:g}. "
            "The exported graph is not the served model; do not use it"
        )

    int8_path = quantize_int8(fp32_path, out_dir / INT8_FILE)
    int8 = OnnxRuntimeModel.for_runtime(runtime, int8_path).run(items, max_batch_tokens)  # [2N, K]
    agreement = ordering_agreement(reference[:n], reference[n:], int8[:n], int8[n:])
    kept = agreement >= keep_int8_threshold
    if not kept:
        int8_path.unlink(missing_ok=True)
        log.warning("int8 model orders %.4f of pairs like fp32 (< %.4f): deleted", agreement, keep_int8_threshold)
    return {
        "fp32_path": str(fp32_path),
        "int8_path": str(int8_path) if kept else None,
        "max_rel_diff": check["max_rel_diff"],
        "max_abs_diff": check["max_abs_diff"],
        "int8_max_rel_diff": max_relative_difference(reference, int8),
        "int8_agreement": agreement,
        "int8_kept": kept,
        "keep_int8_threshold": keep_int8_threshold,
        "pairs": n,
    }
