"""Head-mode features: shared prompts, candidate poolings, the cut backbone, the cache key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import _llama_config, hh_lines

from rm_service.formats.hh import parse_pair
from rm_service.models.pooling import Pooling, depth
from rm_service.models.runtime import load_backbone_runtime
from rm_service.train.features import (
    Candidate,
    _run_whole,
    candidate_layers,
    extract,
    extraction_pooling,
    feature_key,
    prefix_groups,
)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import LlamaModel

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("four-layers")
    LlamaModel(_llama_config(len(tiny_tokenizer), tiny_tokenizer.pad_token_id, num_hidden_layers=4)).save_pretrained(
        path
    )
    tiny_tokenizer.save_pretrained(path)
    return path


def _items(runtime, n_pairs: int = 30):
    prompts, items = [], []
    for line in hh_lines(n_pairs):
        pair = parse_pair(json.loads(line))
        for completion in (pair.chosen, pair.rejected):
            prompts.append(pair.prompt)
            items.append(runtime.format(pair.prompt, completion))
    return prompts, items


CANDS = [Candidate(layer, method) for layer in (2, 3) for method in ("last", "mean")]


def test_shared_prompts_give_the_features_of_whole_items(four_layer_dir):
    runtime = load_backbone_runtime(str(four_layer_dir), 384, precision="fp32", pooling=extraction_pooling(CANDS))
    prompts, items = _items(runtime)
    groups, alone = prefix_groups(runtime, prompts, items)
    assert sum(len(g) for g in groups if len(g) >= 2) >= 20  # chosen and rejected share their prompt
    shared = extract(runtime, prompts, items, CANDS, batch_tokens=2048)
    whole = {c: np.zeros_like(v) for c, v in shared.items()}
    with torch.inference_mode():
        _run_whole(runtime, list(range(len(items))), items, CANDS, whole)  # every item in one pass of its own tokens
    for c in CANDS:
        np.testing.assert_allclose(shared[c], whole[c], rtol=1e-4, atol=1e-5)


def test_a_served_pooling_reproduces_the_cached_candidates(four_layer_dir):
    """A version reads its chosen layers from a backbone cut after the deepest one; the
    features equal the candidates extracted from the deeper cut used in training."""
    runtime = load_backbone_runtime(str(four_layer_dir), 384, precision="fp32", pooling=extraction_pooling(CANDS))
    prompts, items = _items(runtime, 10)
    cands = extract(runtime, prompts, items, CANDS, batch_tokens=2048)
    for pooling, parts in (
        (Pooling(layers=(2,), method="mean"), [cands[Candidate(2, "mean")]]),
        (Pooling(layers=(3,), method="last+mean"), [cands[Candidate(3, "last")], cands[Candidate(3, "mean")]]),
        (Pooling(layers=(2, 3), method="last"), [cands[Candidate(2, "last")], cands[Candidate(3, "last")]]),
    ):
        served = load_backbone_runtime(str(four_layer_dir), 384, precision="fp32", pooling=pooling)
        assert depth(served.model.backbone) == max(pooling.layers)  # blocks past the deepest layer read are gone
        np.testing.assert_allclose(
            served.run(items, 4096, what="features"), np.concatenate(parts, axis=1), rtol=1e-4, atol=1e-5
        )


def test_the_whole_backbone_is_kept_when_its_last_layer_is_read(four_layer_dir):
    runtime = load_backbone_runtime(
        str(four_layer_dir), 384, precision="fp32", pooling=Pooling(layers=(4,), method="last")
    )
    default = load_backbone_runtime(str(four_layer_dir), 384, precision="fp32")
    assert depth(runtime.model.backbone) == 4 and not isinstance(runtime.model.backbone.norm, torch.nn.Identity)
    _, items = _items(runtime, 3)
    np.testing.assert_allclose(
        runtime.run(items, 4096, what="features"), default.run(items, 4096, what="features"), rtol=1e-5
    )


def test_candidate_layers_and_the_cache_key():
    assert candidate_layers("auto", 30, "causal") == (15, 16, 18)
    assert candidate_layers("auto", 6, "encoder") == (3, 4, 6)
    assert candidate_layers("last", 30, "causal") == (30,)
    assert candidate_layers("20, 12", 30, "causal") == (12, 20)
    with pytest.raises(ValueError, match="1..30"):
        candidate_layers("31", 30, "causal")


def test_fp32_and_bf16_features_never_share_a_cache_key(four_layer_dir):
    fp32 = load_backbone_runtime(str(four_layer_dir), 384, precision="fp32")
    bf16 = load_backbone_runtime(str(four_layer_dir), 384, precision="bf16")
    c = Candidate(2, "mean")
    assert feature_key(fp32, c) != feature_key(bf16, c) and ":bf16:mean@2" in feature_key(bf16, c)
