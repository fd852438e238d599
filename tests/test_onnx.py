"""ONNX export and the ONNX Runtime backend on the tiny config-built models.

Causal: the TRL-style LlamaForSequenceClassification checkpoint (its own score layer,
last-token pooling). Encoder: the tiny BERT with a fresh 3-member head (mean pooling).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import HH_FILE

from rm_service.formats.hh import read_pairs
from rm_service.models.onnx_backend import (
    OnnxParityError,
    OnnxRuntimeModel,
    build_onnx_artifacts,
    export_onnx,
    ordering_agreement,
    parity,
)
from rm_service.models.quantize import quantize_int8
from rm_service.models.runtime import load_backbone_runtime

MAX_TOKENS = 256
ONE_BATCH = 1_000_000  # a token budget that puts every item in one padded batch


def _hh_pairs(n: int):
    pairs = [p for _, _, p in read_pairs(HH_FILE) if not isinstance(p, Exception)]
    return pairs[:n]


def _mixed_length_items(runtime, n: int = 6):
    """Chosen items of `n` different token lengths (most under the truncation limit)."""
    seen: dict[int, object] = {}
    for p in _hh_pairs(200):
        item = runtime.format(p.prompt, p.chosen)
        if len(item) not in seen:
            seen[len(item)] = item
        if len(seen) == n:
            break
    items = list(seen.values())
    assert len({len(x) for x in items}) == n
    return items


@pytest.fixture(scope="module", params=["causal", "encoder"])
def exported(request, tiny_rm_dir, tiny_encoder_dir, tmp_path_factory):
    """(runtime, ORT model) for each tiny backbone, exported once per module."""
    if request.param == "causal":
        runtime = load_backbone_runtime(str(tiny_rm_dir), max_tokens=MAX_TOKENS, device="cpu", precision="fp32")
    else:
        runtime = load_backbone_runtime(
            str(tiny_encoder_dir), max_tokens=MAX_TOKENS, ensemble_size=3, device="cpu", precision="fp32"
        )
    path = export_onnx(runtime, tmp_path_factory.mktemp(f"onnx-{request.param}") / "model.onnx")
    return runtime, OnnxRuntimeModel.for_runtime(runtime, path)


def test_export_names_and_dynamic_axes(exported):
    runtime, ort_model = exported
    inputs = {i.name: i.shape for i in ort_model.session.get_inputs()}
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if runtime.spec.kind == "encoder" else [])
    assert list(inputs) == expected
    assert all(shape == ["batch", "sequence"] for shape in inputs.values())
    (output,) = ort_model.session.get_outputs()
    assert output.name == "rewards" and output.shape[0] == "batch"


def test_export_does_not_touch_the_runtime_model(tiny_rm_dir, tmp_path):
    runtime = load_backbone_runtime(str(tiny_rm_dir), max_tokens=MAX_TOKENS, device="cpu", precision="fp32")
    before = runtime.model.backbone.config._attn_implementation
    export_onnx(runtime, tmp_path / "m.onnx")
    assert runtime.model.backbone.config._attn_implementation == before
    assert not runtime.model.training


def test_parity_on_a_padded_batch_of_mixed_lengths(exported):
    runtime, ort_model = exported
    items = _mixed_length_items(runtime)
    report = parity(runtime, ort_model, items, rtol=1e-4, max_batch_tokens=ONE_BATCH)
    assert report["ok"], report
    assert report["max_rel_diff"] <= 1e-4
    assert report["items"] == len(items)
    rewards = ort_model.run(items, ONE_BATCH)
    assert rewards.shape == (len(items), runtime.model.ensemble_size)


def test_both_backends_serve_through_one_interface(exported):
    """The batcher runs either backend through RewardBackend: same pad id, same batches, the same rewards."""
    from rm_service.models.backend import RewardBackend
    from rm_service.models.batching import collate

    runtime, ort_model = exported
    items = _mixed_length_items(runtime)
    rows = [b.run_collated(collate(items, b.pad_id)) for b in (runtime, ort_model) if isinstance(b, RewardBackend)]
    assert len(rows) == 2 and rows[0].shape == (len(items), runtime.model.ensemble_size)
    assert np.abs(rows[0] - rows[1]).max() <= 1e-4 * max(1.0, float(np.abs(rows[0]).max()))


def test_ort_scores_are_batch_invariant(exported):
    """An item scored alone equals the same item padded inside a batch of longer ones."""
    runtime, ort_model = exported
    items = _mixed_length_items(runtime)
    batched = ort_model.run(items, ONE_BATCH)  # one batch, padded to the longest
    alone = ort_model.run(items, max_batch_tokens=1)  # one item per batch, no padding
    assert np.abs(batched - alone).max() <= 1e-5


def test_ordering_agreement():
    chosen, rejected = np.array([1.0, 0.0, 2.0, -1.0]), np.array([0.0, 1.0, 1.0, 0.0])
    assert ordering_agreement(chosen, rejected, chosen, rejected) == 1.0
    assert ordering_agreement(chosen, rejected, rejected, chosen) == 0.0
    flipped_last = np.array([1.0, 0.0, 2.0, 1.0])
    assert ordering_agreement(chosen, rejected, flipped_last, rejected) == 0.75
    members = np.stack([chosen, chosen], axis=1)  # [N, K] -> mean over members
    assert ordering_agreement(members, rejected[:, None], chosen, rejected) == 1.0
    with pytest.raises(ValueError):
        ordering_agreement(chosen[:0], rejected[:0], chosen[:0], rejected[:0])


def _pair_items(runtime, n: int = 6):
    return [(runtime.format(p.prompt, p.chosen), runtime.format(p.prompt, p.rejected)) for p in _hh_pairs(n)]


@pytest.mark.parametrize("threshold, kept", [(0.0, True), (1.01, False)])
def test_build_artifacts_keeps_or_deletes_int8(exported, tmp_path, threshold, kept):
    runtime, _ = exported
    report = build_onnx_artifacts(runtime, tmp_path, _pair_items(runtime), keep_int8_threshold=threshold)
    assert Path(report["fp32_path"]).is_file()
    assert report["max_rel_diff"] <= 1e-4
    assert 0.0 <= report["int8_agreement"] <= 1.0
    assert report["int8_kept"] is kept
    int8_file = tmp_path / "model.int8.onnx"
    assert int8_file.exists() is kept
    assert (report["int8_path"] is not None) is kept
    if kept:
        int8 = OnnxRuntimeModel.for_runtime(runtime, int8_file)
        items = [c for c, _ in _pair_items(runtime, 3)]
        assert int8.run(items, 4096).shape == (3, runtime.model.ensemble_size)


def test_build_artifacts_refuses_a_model_out_of_tolerance(tiny_encoder_dir, tmp_path):
    runtime = load_backbone_runtime(str(tiny_encoder_dir), max_tokens=MAX_TOKENS, device="cpu", precision="fp32")
    with pytest.raises(OnnxParityError, match="tolerance"):
        build_onnx_artifacts(runtime, tmp_path, _pair_items(runtime, 2), rtol=-1.0)  # no difference passes


def test_quantize_int8_is_smaller(exported, tmp_path):
    runtime, ort_model = exported
    out = quantize_int8(ort_model.path, tmp_path / "q.onnx")
    assert out.is_file() and out.stat().st_size < ort_model.path.stat().st_size


def test_int8_leaves_a_biased_score_head_in_fp32(tiny_encoder_dir, tmp_path):
    """A registry head has a bias (exported as Gemm, which the quantiser rewrites to MatMul + Add)."""
    import onnx
    import torch

    runtime = load_backbone_runtime(str(tiny_encoder_dir), max_tokens=MAX_TOKENS, device="cpu", precision="fp32")
    runtime.model.score = torch.nn.Linear(runtime.model.hidden_size, 2, bias=True)
    out = quantize_int8(export_onnx(runtime, tmp_path / "m.onnx"), tmp_path / "q.onnx")
    nodes = onnx.load(str(out)).graph.node
    assert any(n.name.startswith("/model/score/") for n in nodes)
    assert not any(n.name.startswith("/model/score/") and "Integer" in n.op_type for n in nodes)
