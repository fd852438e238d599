"""The formatting contract shared by training and serving."""

from __future__ import annotations

from rm_service.conversation import Message, conversation_id
from rm_service.models.formatting import format_item, spec_for

PROMPT = [
    Message("user", "Hello there"),
    Message("assistant", "Hi! How can I help?"),
    Message("user", "Tell me about bread."),
]


def test_causal_format_uses_the_chat_template_and_ends_with_eos(tiny_tokenizer):
    spec = spec_for(tiny_tokenizer, "llama", max_tokens=512)
    out = format_item(tiny_tokenizer, spec, PROMPT, "Bread is baked dough.")
    assert out.input_ids[-1] == tiny_tokenizer.eos_token_id and not out.truncated
    text = tiny_tokenizer.decode(out.input_ids)
    assert text.startswith("<|im_start|>user\nHello there<|im_end|>")
    assert text.endswith("<|im_start|>assistant\nBread is baked dough.<|im_end|>")


def test_truncation_keeps_the_end_of_the_conversation(tiny_tokenizer):
    spec = spec_for(tiny_tokenizer, "llama", max_tokens=24)
    full = format_item(tiny_tokenizer, spec_for(tiny_tokenizer, "llama", 4096), PROMPT, "Bread is baked dough.")
    cut = format_item(tiny_tokenizer, spec, PROMPT, "Bread is baked dough.")
    assert cut.truncated and len(cut) == 24 and cut.input_ids == full.input_ids[-24:]


def test_encoder_format_is_a_pair_and_keeps_the_completion(tiny_encoder_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    spec = spec_for(tok, "bert", max_tokens=32)
    long_prompt = [Message("user", "word " * 100)]
    out = format_item(tok, spec, long_prompt, "The completion stays.")
    assert out.truncated and len(out) == 32
    assert out.input_ids[0] == tok.cls_token_id and out.input_ids[-1] == tok.sep_token_id
    assert (
        tok.decode([t for t, s in zip(out.input_ids, out.token_type_ids, strict=True) if s == 1][:-1])
        == "the completion stays."
    )


def test_spec_hash_changes_with_the_contract(tiny_tokenizer):
    a = spec_for(tiny_tokenizer, "llama", 512)
    assert a.hash == spec_for(tiny_tokenizer, "llama", 512).hash
    assert a.hash != spec_for(tiny_tokenizer, "llama", 256).hash
    assert a.hash != a.model_copy(update={"chat_template": "{{ messages }}"}).hash


def test_conversation_id_is_content_addressed():
    assert conversation_id(PROMPT) == conversation_id(list(PROMPT))
    assert conversation_id(PROMPT) != conversation_id(PROMPT[:1])
