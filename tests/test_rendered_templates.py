"""Rendered conversations of the common chat templates (OpenRLHF's query, a vLLM input) parsed back
into messages: Llama 3, Gemma and Mistral beside ChatML, chosen by RM_SERVE_HTTP_CHAT_TEMPLATE or by
the first turn marker; what does not follow a template is refused naming the field."""

from __future__ import annotations

import pytest

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.server.http.rendered import parse_rendered

CHAT = [Message("system", "Be brief."), Message("user", "Name a fruit."), Message("assistant", "Apple.")]
CHAT += [Message("user", "Another?")]
LLAMA3 = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nName a fruit.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nApple.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nPear."
)
GEMMA = (
    "<bos><start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\nApple.<end_of_turn>\n"
    "<start_of_turn>user\nAnother?<end_of_turn>\n<start_of_turn>model\nPear.<end_of_turn>\n"
)
MISTRAL = {  # v0.3 / Nemo (no spaces, system prompt block); v0.1 (spaces around contents, </s> then a space)
    "v3": "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Name a fruit.[/INST]Apple.</s>"
    "[INST]Another?[/INST]Pear.</s>",
    "v1": "<s>[SYSTEM_PROMPT] Be brief. [/SYSTEM_PROMPT] [INST] Name a fruit. [/INST] Apple.</s> "
    "[INST] Another? [/INST] Pear.",
}


@pytest.mark.parametrize("template", ["auto", "llama3"])
def test_llama3(template):
    assert parse_rendered(LLAMA3, "q", ["<|begin_of_text|>"], template) == (CHAT, "Pear.")
    assert parse_rendered(LLAMA3 + "<|eot_id|><|end_of_text|>", "q", ["<|end_of_text|>"], template) == (CHAT, "Pear.")


@pytest.mark.parametrize("template", ["auto", "gemma"])
def test_gemma_reads_model_as_assistant(template):
    assert parse_rendered(GEMMA, "q", ["<bos>", "<eos>"], template) == (
        [Message("user", "Name a fruit."), Message("assistant", "Apple."), Message("user", "Another?")],
        "Pear.",
    )


@pytest.mark.parametrize("version", MISTRAL)
@pytest.mark.parametrize("template", ["auto", "mistral"])
def test_mistral_with_and_without_spaces_closed_or_cut(version, template):
    assert parse_rendered(MISTRAL[version], "q", ["<s>", "<pad>"], template) == (CHAT, "Pear.")
    assert parse_rendered(MISTRAL[version] + "<pad><pad>", "q", ["<pad>"], template) == (CHAT, "Pear.")


def test_auto_takes_the_template_whose_marker_comes_first():
    # A ChatML conversation whose reply quotes a Llama 3 marker is ChatML.
    text = "<|im_start|>user\nShow a header.<|im_end|>\n<|im_start|>assistant\nIt is <|start_header_id|>.<|im_end|>"
    assert parse_rendered(text, "q") == ([Message("user", "Show a header.")], "It is <|start_header_id|>.")


@pytest.mark.parametrize(
    "text, template, message",
    [
        ("Hello there", "auto", "no turn marker of ChatML (<|im_start|>), Llama 3"),
        (LLAMA3, "chatml", "is not a chatml conversation: no <|im_start|> marker"),
        ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "auto", "the last turn must be the assistant's"),
        (
            "<|start_header_id|>user<|end_header_id|>Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nYo",
            "llama3",
            "turn 0: the role must be followed by <|end_header_id|>\\n\\n",
        ),
        (
            "<start_of_turn>user\nHi<start_of_turn>model\nYo",
            "gemma",
            "turn 0 ('user') is not closed with <end_of_turn>",
        ),
        ("[INST] Hi [/INST] Yo</s> oops [INST] More [/INST] No", "mistral", "text after </s> that belongs to no turn"),
        ("[INST] Hi", "mistral", "[INST] is not closed with [/INST]"),
        ("[SYSTEM_PROMPT] Be brief. [INST] Hi [/INST] Yo", "mistral", "[SYSTEM_PROMPT] is not closed"),
        ("[INST] Hi [/INST]", "mistral", "the last turn must be the assistant's reply"),
    ],
)
def test_what_follows_no_template_is_refused_naming_the_field(text, template, message):
    with pytest.raises(InvalidArgument, match=r"^query\[3\]") as err:
        parse_rendered(text, "query[3]", ["<pad>"], template)
    assert message in str(err.value)
