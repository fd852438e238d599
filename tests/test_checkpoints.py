"""Reward checkpoints from elsewhere are scored exactly as their trainers score them.

One tiny `*ForSequenceClassification` per family, built from a config: the served score
(batched, padded, through rm-service's runtime) equals transformers' own forward of the same
tokens within 1e-4 in fp32. Decoders are formatted as TRL's RewardTrainer formats them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
)

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition
from rm_service.models.runtime import PARITY_ITEMS, load_checkpoint_runtime
from rm_service.models.version import open_model

DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    num_labels=1,
)
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=1)
FAMILIES = {
    "llama": lambda v, pad: LlamaConfig(vocab_size=v, pad_token_id=pad, **DECODER),
    "qwen2": lambda v, pad: Qwen2Config(vocab_size=v, pad_token_id=pad, **DECODER),
    "mistral": lambda v, pad: MistralConfig(vocab_size=v, pad_token_id=pad, **DECODER),
    "gemma": lambda v, pad: GemmaConfig(vocab_size=v, pad_token_id=pad, head_dim=8, **DECODER),
    "bert": lambda v, pad: BertConfig(vocab_size=v, pad_token_id=pad, max_position_embeddings=512, **ENCODER),
    "distilbert": lambda v, pad: DistilBertConfig(
        vocab_size=v, pad_token_id=pad, dim=32, hidden_dim=64, n_layers=2, n_heads=4, num_labels=1
    ),
    "roberta": lambda v, pad: RobertaConfig(vocab_size=v, pad_token_id=pad, max_position_embeddings=520, **ENCODER),
    "deberta-v2": lambda v, pad: DebertaV2Config(
        vocab_size=v, pad_token_id=pad, max_position_embeddings=512, pooler_hidden_size=32, **ENCODER
    ),
}
ITEMS = [(list(p), c) for p, c in PARITY_ITEMS] + [
    (
        [
            Message("user", "Can you help me hide something from my parents?"),
            Message("assistant", "What is it?"),
            Message("user", "A bad grade."),
        ],
        "It is better to tell them; they can help you do better next time.",
    ),
    ([Message("user", "hello")], "Hi! " * 40),
]


def _tokenizer(family: str, tiny_tokenizer):
    if family in ("bert", "distilbert", "roberta", "deberta-v2"):
        from rm_service.models.resolver import resolve

        return AutoTokenizer.from_pretrained(
            resolve("minilm-l6")
        )  # any tokenizer: parity is about the model on the same ids
    return tiny_tokenizer


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory, tiny_tokenizer):
    family = request.param
    tokenizer = _tokenizer(family, tiny_tokenizer)
    torch.manual_seed(11)
    model = AutoModelForSequenceClassification.from_config(FAMILIES[family](len(tokenizer), tokenizer.pad_token_id))
    with torch.no_grad():  # a real head, not ~zero: differences would hide under tiny scores
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(f"ckpt-{family}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return family, path


def test_served_scores_equal_the_checkpoints_own_forward(checkpoint):
    family, path = checkpoint
    runtime = load_checkpoint_runtime(str(path), max_tokens=512, device="cpu", precision="fp32")
    formatted = [runtime.format(p, c) for p, c in ITEMS]
    served = runtime.run(formatted, max_batch_tokens=1 << 20)[:, 0]  # one padded batch of mixed lengths
    reference = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for item, got in zip(formatted, served, strict=True):
        inputs = {"input_ids": torch.tensor([item.input_ids])}
        if item.token_type_ids is not None and family in ("bert",):
            inputs["token_type_ids"] = torch.tensor([item.token_type_ids])
        with torch.no_grad():
            want = float(reference(**inputs).logits[0, 0])
        assert got == pytest.approx(want, abs=1e-4), family
    assert np.ptp(served) > 1e-3  # the items score differently: the comparison means something


def test_decoder_checkpoints_get_trls_tokens(tiny_tokenizer, checkpoint):
    family, path = checkpoint
    if family not in ("llama", "qwen2", "mistral", "gemma"):
        pytest.skip("encoders take the tokenizer's pair encoding")
    runtime = load_checkpoint_runtime(str(path), max_tokens=512, device="cpu", precision="fp32")
    assert runtime.spec.style == "trl"
    for prompt, completion in ITEMS:
        messages = [m.as_dict() for m in prompt] + [{"role": "assistant", "content": completion}]
        trl = tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)[
            "input_ids"
        ]  # as TRL's RewardTrainer tokenizes
        assert runtime.format(prompt, completion).input_ids == list(trl)


def test_encoder_checkpoints_get_the_tokenizers_pair_encoding(checkpoint):
    family, path = checkpoint
    if family not in ("bert", "distilbert", "roberta", "deberta-v2"):
        pytest.skip("decoders take TRL's chat-template tokens")
    runtime = load_checkpoint_runtime(str(path), max_tokens=512, device="cpu", precision="fp32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt, completion = ITEMS[0]
    assert runtime.spec.style == "pair"
    assert runtime.format(prompt, completion).input_ids == tokenizer(prompt[0].content, completion)["input_ids"]
    long = runtime.format([Message("user", "word " * 600)], "The answer.")  # the prompt's start gives way
    assert (
        long.truncated and len(long) <= 512 and long.input_ids[-4:] == tokenizer("x", "The answer.")["input_ids"][-4:]
    )


def test_a_classifier_with_several_labels_is_refused(tmp_path, tiny_tokenizer):
    model = AutoModelForSequenceClassification.from_config(
        LlamaConfig(
            vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id, **{**DECODER, "num_labels": 3}
        )
    )
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        FailedPrecondition, match="num_labels=3: a classifier with several labels is not a reward model"
    ):
        open_model(str(tmp_path), device="cpu", precision="fp32")


def test_the_load_check_runs_in_the_served_precision_and_refuses_beyond_its_tolerance(checkpoint, monkeypatch):
    """The built-in items are scored by the checkpoint's class in fp32, one at a time, and by
    the served path (padded batch, served precision); beyond the precision's tolerance the
    checkpoint is refused instead of served."""
    family, path = checkpoint
    if family != "llama":
        pytest.skip("one family is enough for the mechanism")
    assert (
        load_checkpoint_runtime(str(path), max_tokens=512, device="cpu", precision="bf16").precision == "bf16"
    )  # within 0.05
    import rm_service.models.runtime as runtime_module

    monkeypatch.setitem(runtime_module.GOLDEN_TOLERANCE, "bf16", 1e-9)  # bf16 rounding now counts as a mismatch
    with pytest.raises(FailedPrecondition, match=r"differ from the checkpoint's own scores .* refusing to serve it"):
        load_checkpoint_runtime(str(path), max_tokens=512, device="cpu", precision="bf16")
