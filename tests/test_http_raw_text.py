"""Raw-text mode (`RM_SERVE_HTTP_CHAT_TEMPLATE=raw`), OpenRLHF serve_rm's way of scoring a query:
the text tokenised as it is with the reward model's tokenizer, no chat template parsed, nothing
stripped or appended; and the default, which stays strict (an unparsable render is 400)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from conftest import ServerThread

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.models.formatting import FormatSpec, format_raw, tokenizer_fingerprint
from rm_service.settings import ServeSettings

PROMPT = [{"role": "user", "content": "How do I keep basil alive?"}]
REPLY = "Six hours of sun, and water when the soil is dry."


def _server(tiny_rm_dir, **settings) -> ServerThread:
    return ServerThread(
        ServeSettings(
            port=0, http_port=0, model=str(tiny_rm_dir), precision="fp32", with_store=False, metrics_port=-1, **settings
        )
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_rm_dir):
    """(raw, strict): the same model served with http_chat_template raw and with the default."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RM_HOME", str(tmp_path_factory.mktemp("home")))
    raw, strict = _server(tiny_rm_dir, http_chat_template="raw"), _server(tiny_rm_dir)
    yield raw, strict
    raw.stop()
    strict.stop()
    mp.undo()


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{srv.server.http.port}{path}", json=body, timeout=60)


def _score(srv) -> reward_pb2.ScoreResult:
    prompt = [common_pb2.Message(**m) for m in PROMPT]
    with grpc.insecure_channel(srv.address) as channel:
        request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(id="0", prompt=prompt, completion=REPLY)])
        return reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=60).results[0]


def test_raw_mode_scores_the_text_as_it_is(servers, tiny_tokenizer):
    raw, strict = servers
    runtime = raw.server.served.get().runtime
    # The text the version's own contract makes of the conversation: scored raw, it is exactly
    # Score's item (the same tokens), so the same reward.
    item = runtime.format([_message(m) for m in PROMPT], REPLY)
    contract_text = tiny_tokenizer.decode(item.input_ids, skip_special_tokens=False)
    r = _post(raw, "/get_reward", {"query": [contract_text], "prompts": [""], "labels": [None]})
    assert r.status_code == 200, r.text
    expected = _score(raw)
    assert r.json()["rewards"] == [pytest.approx(expected.reward, abs=1e-5)]
    assert r.json()["extra_logs"]["truncated"] == [0.0]
    # Nothing stripped: whitespace after the last turn changes the tokens, so the reward, in raw
    # mode, while the strict parser reads the same messages (the contract renders them anew).
    spaced = contract_text + "\n\n"
    r_raw = _post(raw, "/get_reward", {"query": [spaced]}).json()["rewards"][0]
    r_strict = _post(strict, "/get_reward", {"query": [spaced]}).json()["rewards"][0]
    assert r_strict == pytest.approx(expected.reward, abs=1e-5)
    assert abs(r_raw - expected.reward) > 1e-4
    # Token ids on vLLM's routes are scored as sent too (not decoded and parsed).
    r = _post(raw, "/classify", {"input": item.input_ids, "use_activation": False})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["probs"] == [pytest.approx(expected.reward, abs=1e-5)]


def test_raw_mode_takes_text_the_strict_default_refuses(servers):
    raw, strict = servers
    text = f"Question: {PROMPT[0]['content']}\nAnswer: {REPLY}"  # no chat template at all
    r = _post(strict, "/get_reward", {"query": [text]})
    assert r.status_code == 400 and r.json()["error"].startswith("query[0]: is not a rendered conversation")
    r = _post(raw, "/get_reward", {"query": [text, text + " Also mulch."]})
    assert r.status_code == 200, r.text
    rewards = r.json()["rewards"]
    assert len(set(rewards)) == 2  # two texts, two rewards
    r = _post(raw, "/pooling", {"input": text, "use_activation": False})  # vLLM's routes read text raw too
    assert r.status_code == 200 and r.json()["data"][0]["data"] == [pytest.approx(rewards[0], abs=1e-5)]
    r = _post(raw, "/get_reward", {"query": [text, " \n"]})
    assert r.status_code == 400 and r.json()["error"].startswith("query[1]: is empty"), r.text


def test_raw_mode_keeps_the_end_of_a_long_text(servers, tiny_tokenizer):
    raw, _ = servers
    window = raw.server.served.get().runtime.spec.max_tokens
    text = " ".join(["The basil wilts in the shade."] * window) + f" {REPLY}"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > window
    body = _post(raw, "/get_reward", {"query": [text]}).json()
    assert body["extra_logs"]["truncated"] == [1.0]
    kept = _post(raw, "/classify", {"input": ids[-window:], "use_activation": False}).json()
    assert body["rewards"] == [pytest.approx(kept["data"][0]["probs"][0], abs=1e-5)]


def test_format_raw_for_causal_and_encoder_tokenizers(tiny_tokenizer, tiny_encoder_dir):
    from transformers import AutoTokenizer

    spec = FormatSpec(kind="causal", max_tokens=8, tokenizer_fingerprint=tokenizer_fingerprint(tiny_tokenizer))
    text = "<|im_start|>user\nHi<|im_end|> plain words after it, many of them"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    item = format_raw(tiny_tokenizer, spec, text)
    assert item.input_ids == ids[-8:] and item.truncated and item.token_type_ids is None
    assert format_raw(tiny_tokenizer, spec, ids[:5]) == format_raw(tiny_tokenizer, spec, ids[:5])
    assert format_raw(tiny_tokenizer, spec, ids[:5]).input_ids == ids[:5]
    huge = "word " * 200_000  # a megabyte: only the end's text is tokenised, and the end is what is kept
    assert format_raw(tiny_tokenizer, spec, huge).input_ids == tiny_tokenizer("word " * 50)["input_ids"][-8:]

    encoder = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    spec = FormatSpec(kind="encoder", max_tokens=6, tokenizer_fingerprint=tokenizer_fingerprint(encoder))
    words = encoder("one two three four five six", add_special_tokens=False)["input_ids"]
    item = format_raw(encoder, spec, "one two three four five six")
    assert item.input_ids == [encoder.cls_token_id, *words[-4:], encoder.sep_token_id]
    assert item.token_type_ids == [0] * 6 and item.truncated
    # Within the window: the encoder's own single-text encoding.
    short = format_raw(encoder, spec, "one two")
    assert short.input_ids == encoder("one two")["input_ids"] and not short.truncated


def _message(m: dict):
    from rm_service.conversation import Message

    return Message(m["role"], m["content"])
