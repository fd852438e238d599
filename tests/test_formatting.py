"""The formatting contract shared by training and serving."""

from __future__ import annotations

import copy

import pytest

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


# -- cutting before tokenising: the same ids as tokenising everything and truncating --------------

# A template that checks the roles alternate (as Llama 2's and Mistral's do) and adds a system prompt
# when there is none (as SmolLM2's does): the cut must keep both behaviours.
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' and (message['role'] == 'user') != "
    "((loop.index0 - (1 if messages[0]['role'] == 'system' else 0)) % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _texts(seed: int, n: int) -> list[str]:
    """HH sentences, and the texts that break a fixed characters-per-token guess: long tokens
    (runs of spaces, one long word), many short ones (CJK, emoji), markup."""
    import json
    import random

    from conftest import hh_lines

    rng = random.Random(seed)
    hh = [json.loads(line)["chosen"] for line in hh_lines(200)]
    odd = ["   " * 400 + "x", "a" * 3000, "数据集" * 700, "🙂" * 1500, "<b>" * 900, "word\n\n" * 600]
    out = []
    for _ in range(n):
        pick = rng.random()
        text = rng.choice(odd) if pick < 0.25 else "".join(rng.choice(hh) for _ in range(rng.randint(1, 6)))
        out.append(text[: rng.randint(1, len(text))] if rng.random() < 0.3 else text)
    return out


def _conversations(seed: int, count: int):
    import random

    rng = random.Random(seed)
    texts = _texts(seed, count * 12)
    for _ in range(count):
        turns = rng.randint(1, 9)
        prompt = [Message("system", texts.pop())] if rng.random() < 0.3 else []
        for i in range(turns):
            prompt.append(Message("user" if i % 2 == 0 else "assistant", texts.pop()))
        if prompt[-1].role == "assistant":
            prompt.append(Message("user", texts.pop()))
        yield prompt, texts.pop()


def _uncut(tokenizer, spec, prompt, completion):
    from rm_service.models import formatting

    kind = "pair" if spec.style == "pair" else spec.kind
    return formatting._FORMATTERS[kind](tokenizer, spec, prompt, completion, 1 << 60)


@pytest.mark.parametrize("template", ["chatml", "strict"])
@pytest.mark.parametrize("style", ["rm_service", "trl"])
def test_causal_items_cut_before_tokenising_are_the_truncated_whole(tiny_tokenizer, template, style):
    spec = spec_for(tiny_tokenizer, "llama", max_tokens=96, style=style)
    if template == "strict":
        spec = spec.model_copy(update={"chat_template": STRICT_TEMPLATE})
    cut = 0
    for prompt, completion in _conversations(1 if style == "trl" else 0, 60):
        got, want = (
            format_item(tiny_tokenizer, spec, prompt, completion),
            _uncut(tiny_tokenizer, spec, prompt, completion),
        )
        assert got == want, (prompt, completion)
        cut += want.truncated
    assert cut >= 20  # most items were over the window, so most were cut


@pytest.mark.parametrize("style", ["rm_service", "pair"])
def test_encoder_items_cut_before_tokenising_are_the_truncated_whole(tiny_encoder_dir, style):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    spec = spec_for(tok, "bert", max_tokens=64, style=style)
    cut = 0
    for prompt, completion in _conversations(2, 60):
        got, want = format_item(tok, spec, prompt, completion), _uncut(tok, spec, prompt, completion)
        assert got == want, (prompt, completion)
        cut += want.truncated
    assert cut >= 20


def test_a_huge_prompt_is_cut_before_the_tokeniser_sees_it(tiny_tokenizer):
    """500 messages of 32,000 characters (16 MB): the tokeniser is given a few windows' worth."""
    seen = []
    real = tiny_tokenizer.__class__.__call__

    class Watching(tiny_tokenizer.__class__):
        def __call__(self, text, *args, **kwargs):
            seen.append(len(text))
            return real(self, text, *args, **kwargs)

    watched = copy.copy(tiny_tokenizer)
    watched.__class__ = Watching
    spec = spec_for(tiny_tokenizer, "llama", max_tokens=1024)
    prompt = [
        Message("user" if i % 2 == 0 else "assistant", f"message {i} " + "words of text " * 2300) for i in range(499)
    ]
    item = format_item(watched, spec, prompt, "a reply " * 4000)
    assert item.truncated and len(item) == 1024 and max(seen) < 20 * 1024
