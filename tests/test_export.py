"""`models export --format hf`: versions built from the tiny backbones, exported, loaded back by
transformers' own AutoModelForSequenceClassification and scored against the served version;
the versions a standard classifier cannot express are refused, and why is checked numerically."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.models.batching import collate
from rm_service.models.export import EXPORT_META, export_hf
from rm_service.models.pooling import Pooling
from rm_service.models.runtime import load_backbone_runtime
from rm_service.models.version import VersionMeta, golden_items, open_version, write_version
from rm_service.settings import ModelSettings

PAIRS = [
    ([Message("user", "How long should bread rise?")], "About an hour, until it doubles."),
    ([Message("user", "Hi."), Message("assistant", "Hello!"), Message("user", "Name a fruit.")], "A pear."),
    ([Message("user", "Say something long.")], "Flour, water, salt and time. " * 40),
]


def make_version(
    backbone_dir, name: str, pooling: Pooling, mode: str = "head", bias: bool = True, ensemble: int = 3
) -> str:
    """A registry version from a tiny backbone: random heads ([K, F], [K]); in full mode a changed
    backbone saved inside the version, as full-mode training leaves it."""
    from rm_service.train.head_mode import install
    from rm_service.train.run import _save_backbone

    torch.manual_seed(5)
    runtime = load_backbone_runtime(
        str(backbone_dir), 256, ensemble_size=ensemble, device="cpu", precision="fp32", pooling=pooling
    )
    width = pooling.width(runtime.model.backbone.config.hidden_size)
    weight = (torch.randn(ensemble, width) * 0.5).numpy()
    b = (torch.randn(ensemble) + 0.7).numpy() if bias else np.zeros(ensemble, np.float32)
    install(runtime, pooling, weight, b)
    directory = ModelSettings().artifacts_dir / name
    backbone, key = str(backbone_dir), runtime.backbone_key
    if mode == "full":
        with torch.no_grad():
            for p in runtime.model.backbone.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # fine-tuned: the export must carry these weights, not the base ones
        backbone, key = _save_backbone(runtime, directory.with_name(name + ".tmp"))
    meta = VersionMeta(
        version=name,
        mode=mode,
        backbone=backbone,
        base_backbone=str(backbone_dir),
        backbone_key=key,
        format=runtime.spec,
        format_hash=runtime.spec.hash,
        precision="fp32",
        pooling=runtime.model.pooling,
        ensemble_size=ensemble,
        reward_mean=0.25,
        reward_std=1.5,
        golden=golden_items(runtime, PAIRS),
    )
    write_version(directory, meta, weight, b)
    return name


def transformers_scores(directory, runtime, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the exported directory by transformers alone: one item at a time, and one
    right-padded batch padded with the exported tokenizer's pad id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    items = [runtime.format(p, c) for p, c in pairs]
    with torch.no_grad():
        alone = np.array([float(model(input_ids=torch.tensor([x.input_ids])).logits[0, 0]) for x in items])
        batch = collate(items, tokenizer.pad_token_id)
        batched = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].numpy()
    return alone, batched


def served_raw(name: str, pairs) -> tuple[np.ndarray, object]:
    runtime, _ = open_version(ModelSettings().artifacts_dir / name, device="cpu", precision="fp32")
    items = [runtime.format(p, c) for p, c in pairs]
    return runtime.run(items, max_batch_tokens=1 << 20).mean(axis=1), runtime  # [N], in one padded batch


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 backbone (LayerNorm with a bias at the end) with the chat-template tokenizer."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(4)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2Model(
        GPT2Config(
            vocab_size=len(tiny_tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=1024,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    ).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


NEW_PAIRS = [
    ([Message("user", "What goes in a sandwich?")], "Bread, cheese and a tomato."),
    ([Message("user", "Count to three.")], "One, two, three."),
    ([Message("user", "Tell me about tea.")], "Tea is steeped leaves. " * 30),
]


def test_a_full_mode_version_exports_and_scores_identically(home, tiny_backbone_dir, tmp_path):
    name = make_version(tiny_backbone_dir, "v1", Pooling(method="last"), mode="full", bias=False)
    report = export_hf(name, tmp_path / "out")
    assert report.architecture == "LlamaForSequenceClassification" and report.max_difference <= 1e-4
    served, runtime = served_raw(name, NEW_PAIRS)
    alone, batched = transformers_scores(tmp_path / "out", runtime, NEW_PAIRS)
    np.testing.assert_allclose(alone, served, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(batched, served, atol=1e-4, rtol=1e-4)
    assert np.ptp(served) > 0.01  # the items score apart: equal scores are not a trivial match
    base_only = make_version(
        tiny_backbone_dir, "v2", Pooling(method="last"), mode="head", bias=False
    )  # same heads, base backbone
    assert not np.allclose(
        served_raw(base_only, NEW_PAIRS)[0], served, atol=1e-3
    )  # so the fine-tuned weights were exported
    record = json.loads((tmp_path / "out" / EXPORT_META).read_text())
    assert record["reward_mean"] == 0.25 and record["reward_std"] == 1.5 and record["exported_from"] == "v1"
    assert set((tmp_path / "out").iterdir()) >= {
        tmp_path / "out" / f for f in ("config.json", "model.safetensors", "tokenizer.json")
    }


def test_a_tokenizer_that_pads_with_eos_gets_another_pad_id(home, tiny_backbone_dir, tmp_path):
    """SmolLM2 pads with the EOS that ends every item; transformers reads the score at the last
    token that is not the pad id, so the export pads with another special token."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    backbone = tmp_path / "eos-pad"
    shutil.copytree(tiny_backbone_dir, backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(backbone)
    name = make_version(backbone, "v1", Pooling(method="last"), mode="full", bias=False)
    export_hf(name, tmp_path / "out")
    pad = AutoConfig.from_pretrained(tmp_path / "out").pad_token_id
    assert pad == AutoTokenizer.from_pretrained(tmp_path / "out").pad_token_id != tokenizer.eos_token_id
    served, runtime = served_raw(name, NEW_PAIRS)
    for scores in transformers_scores(tmp_path / "out", runtime, NEW_PAIRS):
        np.testing.assert_allclose(scores, served, atol=1e-4, rtol=1e-4)


def test_a_head_mode_bias_is_folded_into_a_layernorm_bias(home, tiny_gpt2_dir, tmp_path):
    name = make_version(tiny_gpt2_dir, "v1", Pooling(layers=(2,), method="last"), bias=True)
    report = export_hf(name, tmp_path / "out")
    assert report.architecture == "GPT2ForSequenceClassification"
    served, runtime = served_raw(name, NEW_PAIRS)
    alone, batched = transformers_scores(tmp_path / "out", runtime, NEW_PAIRS)
    np.testing.assert_allclose(alone, served, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(batched, served, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "pooling, bias, reason",
    [
        (Pooling(layers=(2,), method="last"), True, "final norm \\(LlamaRMSNorm\\) has no bias"),
        (Pooling(layers=(1,), method="last"), False, "layer 1 of 2: a middle layer"),
        (Pooling(layers=(2,), method="last+mean"), False, "no completion mean"),
    ],
)
def test_what_a_standard_classifier_cannot_express_is_refused(home, tiny_backbone_dir, tmp_path, pooling, bias, reason):
    name = make_version(tiny_backbone_dir, "v1", pooling, bias=bias)
    with pytest.raises(InvalidArgument, match=reason) as err:
        export_hf(name, tmp_path / "out")
    assert "--mode full" in str(err.value) and not (tmp_path / "out").exists()


def test_an_encoder_version_is_refused(home, tiny_encoder_dir, tmp_path):
    name = make_version(tiny_encoder_dir, "v1", Pooling(method="all_mean"), bias=False)
    with pytest.raises(InvalidArgument, match="encoder"):
        export_hf(name, tmp_path / "out")


def test_cutting_a_pre_norm_decoder_after_a_middle_layer_is_not_exact(home, tiny_backbone_dir):
    """Why layer-1 features are refused: a Llama classifier cut to 1 layer applies the final norm
    to that layer's states, and scores differently from the version."""
    from transformers import LlamaForSequenceClassification

    name = make_version(tiny_backbone_dir, "v1", Pooling(layers=(1,), method="last"), bias=False)
    served, runtime = served_raw(name, NEW_PAIRS)
    cut = LlamaForSequenceClassification.from_pretrained(
        tiny_backbone_dir, num_labels=1, num_hidden_layers=1, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        cut.score.weight.copy_(runtime.model.score.weight.mean(0, keepdim=True))
        scores = np.array(
            [float(cut(input_ids=torch.tensor([runtime.format(p, c).input_ids])).logits[0, 0]) for p, c in NEW_PAIRS]
        )
    assert np.abs(scores - served).max() > 1e-2


def test_cli_export_writes_a_loadable_directory_and_a_bad_version_is_one_line(
    home, tiny_backbone_dir, tmp_path, capsys
):
    """The CLI in-process (tests/conftest.py run_cli; test_cli starts the real process once for
    the exit status and stderr a shell sees)."""
    from conftest import run_cli
    from transformers import AutoModelForSequenceClassification

    make_version(tiny_backbone_dir, "v1", Pooling(method="last"), mode="full", bias=False)
    run = lambda *args: run_cli("models", *args, capsys=capsys)
    code, out, err = run("export", "v1", "--format", "hf", str(tmp_path / "hf"))
    assert code == 0, err
    assert "LlamaForSequenceClassification" in out
    code, _, err = run("export", "v9", "--format", "hf", str(tmp_path / "other"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "v9" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()
    code, _, err = run("export", "v1")
    assert code == 2 and "directory" in err
    code, _, err = run(
        "export", "v1", "--format", "hf", str(tmp_path / "hf")
    )  # not empty: refused, nothing overwritten
    assert code == 2 and "not an empty directory" in err
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").config.num_labels == 1
