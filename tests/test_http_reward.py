"""The HTTP reward routes over real HTTP to a real server on port 0, in the request shapes the
peers send (OpenRLHF's remote reward model, vLLM's classify and pooling as verl calls them),
scores equal to gRPC Score's for the same conversations; errors 4xx naming the field, never
500; auth and metrics as gRPC's; readiness (HTTP /health, gRPC health, UNAVAILABLE while the
model loads); what a store-only or model-only process mounts and reports."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import threading

import grpc
import httpx
import pytest
from conftest import ServerThread, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from labeling import TOKENS

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.server.http.rendered import parse_chatml
from rm_service.settings import SecuritySettings, ServeSettings

CONVERSATIONS = [
    ([Message("user", "How do I bake bread?")], "Mix flour, water, yeast and salt, knead, let it rise, bake."),
    (
        [
            Message("system", "You are terse."),
            Message("user", "Name a fruit."),
            Message("assistant", "Apple."),
            Message("user", "Another one?"),
        ],
        "Banana.",
    ),
    ([Message("user", "Is the sea salty?")], "No."),
]


def _grpc_scores(address: str, conversations) -> reward_pb2.ScoreResponse:
    with grpc.insecure_channel(address) as channel:
        items = [
            reward_pb2.ScoreItem(
                id=str(i), prompt=[common_pb2.Message(role=m.role, content=m.content) for m in prompt], completion=c
            )
            for i, (prompt, c) in enumerate(conversations)
        ]
        return reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(items=items), timeout=60)


def _openrlhf_query(tokenizer, prompt: list[Message], response: str, tail: str = "<|im_end|>") -> tuple[str, str]:
    """(query, prompt) as OpenRLHF sends them: the prompt rendered with the chat template and the
    generation prompt, the response's tokens after it, the whole decoded with its special tokens."""
    rendered = tokenizer.apply_chat_template([m.as_dict() for m in prompt], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered + response + tail, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=False), rendered


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_rm_dir):
    """A model-only process (no store) with HTTP: the reward routes serve without the store."""
    server = ServerThread(
        ServeSettings(
            port=0,
            http_port=0,
            model=str(tiny_rm_dir),
            precision="fp32",
            with_store=False,
            metrics_port=-1,
            max_items_per_request=8,
            max_message_bytes=64 * 1024,
        )
    )
    yield server
    server.stop()


def _url(srv, path: str) -> str:
    return f"http://127.0.0.1:{srv.server.http.port}{path}"


def test_openrlhf_get_reward_matches_grpc_score(srv, tiny_tokenizer):
    tails = ["<|im_end|>", "<|im_end|><pad><pad>", ""]  # EOS; EOS and padding; a reply cut at the token limit
    queries, prompts = zip(
        *[_openrlhf_query(tiny_tokenizer, p, c, t) for (p, c), t in zip(CONVERSATIONS, tails, strict=True)],
        strict=True,
    )
    r = httpx.post(
        _url(srv, "/get_reward"),
        json={"query": list(queries), "prompts": list(prompts), "labels": [None, "B", None]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _grpc_scores(srv.address, CONVERSATIONS)
    assert body["rewards"] == pytest.approx([x.reward for x in expected.results], abs=1e-5)
    assert body["scores"] == body["rewards"]  # OpenRLHF reads scores for dynamic filtering
    assert body["extra_logs"]["raw_score"] == pytest.approx([x.raw_score for x in expected.results], abs=1e-5)
    assert set(body["extra_logs"]) == {"raw_score", "uncertainty", "truncated"}
    assert all(
        len(v) == 3 and all(isinstance(x, float) for x in v) for v in body["extra_logs"].values()
    )  # OpenRLHF makes tensors of them
    assert body["model_version"] == expected.model_version
    assert len(set(body["rewards"])) == 3  # three different conversations, three different rewards


def test_vllm_classify_and_pooling_match_grpc_score(srv, tiny_tokenizer):
    expected = _grpc_scores(srv.address, CONVERSATIONS)
    rewards = [x.reward for x in expected.results]
    rendered = [
        tiny_tokenizer.apply_chat_template(
            [m.as_dict() for m in p] + [{"role": "assistant", "content": c}], tokenize=False
        )
        for p, c in CONVERSATIONS
    ]
    # verl's reward loop: the reward model's template applied, one text per request, activation off.
    for i, text in enumerate(rendered):
        r = httpx.post(
            _url(srv, "/classify"), json={"model": "/some/rm/path", "input": text, "activation": False}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"][-1]["probs"][-1] == pytest.approx(rewards[i], abs=1e-5)
    # vLLM's chat form: one conversation as messages, content as a string or text parts; sigmoid by default.
    (prompt, completion) = CONVERSATIONS[1]
    messages = [m.as_dict() for m in prompt] + [
        {"role": "assistant", "content": [{"type": "text", "text": completion}]}
    ]
    r = httpx.post(_url(srv, "/v1/classify"), json={"model": expected.model_version, "messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == expected.model_version
    [data] = body["data"]
    assert data["index"] == 0 and data["num_classes"] == 1
    assert data["probs"] == [pytest.approx(1 / (1 + math.exp(-rewards[1])), abs=1e-5)]
    assert body["usage"]["prompt_tokens"] == expected.results[1].num_tokens and body["usage"]["completion_tokens"] == 0
    # /pooling: a batch of texts; the reward as it is with use_activation false, through the
    # sigmoid by default (vLLM applies a classification model's activation on /pooling too).
    r = httpx.post(_url(srv, "/pooling"), json={"input": rendered, "use_activation": False}, timeout=60)
    assert r.status_code == 200, r.text
    assert [d["data"][0] for d in r.json()["data"]] == pytest.approx(rewards, abs=1e-5)
    assert [d["index"] for d in r.json()["data"]] == [0, 1, 2]
    assert r.json()["usage"]["prompt_tokens"] == sum(x.num_tokens for x in expected.results)
    r = httpx.post(_url(srv, "/v1/pooling"), json={"input": rendered, "encoding_format": "base64"}, timeout=60)
    assert r.status_code == 200, r.text
    decoded = [struct.unpack("<f", base64.b64decode(d["data"]))[0] for d in r.json()["data"]]
    assert decoded == pytest.approx([1 / (1 + math.exp(-x)) for x in rewards], abs=1e-5)
    # Token ids of the reward model's tokenizer, one conversation or several, read as the decoded text.
    ids = [tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    r = httpx.post(_url(srv, "/classify"), json={"input": ids, "use_activation": False}, timeout=60)
    assert r.status_code == 200, r.text
    assert [d["probs"][0] for d in r.json()["data"]] == pytest.approx(rewards, abs=1e-5)
    r = httpx.post(_url(srv, "/pooling"), json={"input": ids[0], "use_activation": False}, timeout=60)
    assert r.json()["data"][0]["data"] == [pytest.approx(rewards[0], abs=1e-5)]


def test_vllm_models_ping_and_version(srv):
    served = srv.server.served
    r = httpx.get(_url(srv, "/v1/models"), timeout=60)
    assert r.status_code == 200, r.text
    [model] = r.json()["data"]
    assert r.json()["object"] == "list" and model["id"] == served.default and model["object"] == "model"
    assert model["max_model_len"] == served.get().runtime.spec.max_tokens
    assert httpx.get(_url(srv, "/ping"), timeout=60).status_code == 200
    from rm_service import __version__

    assert httpx.get(_url(srv, "/version"), timeout=60).json() == {"version": __version__}


def _message(r: httpx.Response) -> str:
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error


def test_a_rendered_conversation_parses_back_to_its_messages(tiny_tokenizer):
    for prompt, completion in CONVERSATIONS:
        messages = [m.as_dict() for m in prompt] + [{"role": "assistant", "content": completion}]
        text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
        assert parse_chatml(text, "q") == (prompt, completion)
        assert parse_chatml("<s>" + text + "<pad>", "q", ["<pad>"]) == (
            prompt,
            completion,
        )  # a BOS before, padding after
    assert parse_chatml(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n  Hello \n<pad><pad>", "q", ["<pad>"]
    ) == ([Message("user", "Hi")], "  Hello \n")  # cut at the limit: padding dropped, the reply's own whitespace kept
    assert parse_chatml("…t rose.<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\nNo", "q") == (
        [Message("user", "More?")],
        "No",
    )  # what is left of a prompt cut from the left is dropped
    for bad, message in [
        ("Hello there", "no <|im_start|> marker"),
        ("<|im_start|>user\nHi<|im_end|>", "the last turn must be the assistant's reply"),
        ("<|im_start|>user\nHi<|im_start|>assistant\nYo<|im_end|>", "turn 0 ('user') is not closed"),
        ("<|im_start|>user\nHi<|im_end|> and then <|im_start|>assistant\nYo", "text after <|im_end|>"),
        ("<|im_start|>user Hi<|im_end|><|im_start|>assistant\nYo", "turn 0: the role must be followed by a newline"),
    ]:
        with pytest.raises(InvalidArgument, match="^q") as err:
            parse_chatml(bad, "q", ["<pad>"])
        assert message in str(err.value)


GOOD = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/get_reward", b"{not json", "body"),
        ("/get_reward", b"[1, 2]", "body"),
        ("/get_reward", b"\xff\xfe", "body"),
        ("/get_reward", {"prompts": ["x"]}, "query"),
        ("/get_reward", {"query": GOOD}, "query"),
        ("/get_reward", {"query": []}, "query"),
        ("/get_reward", {"query": [GOOD, 7]}, "query[1]"),
        ("/get_reward", {"query": [GOOD] * 9}, "query"),
        ("/get_reward", {"query": [GOOD, GOOD], "prompts": ["p"]}, "prompts"),
        ("/get_reward", {"query": [GOOD], "prompts": [3]}, "prompts[0]"),
        ("/get_reward", {"query": [GOOD], "labels": "x"}, "labels"),
        ("/get_reward", {"query": ["Plain text, no template"]}, "query[0]"),
        ("/get_reward", {"query": ["<|im_start|>user\nHi<|im_end|>"]}, "query[0]"),
        (
            "/get_reward",
            {"query": ["<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n<|im_end|>"]},
            "query[0].completion",
        ),
        (
            "/get_reward",
            {"query": ["<|im_start|>robot\nHi<|im_end|><|im_start|>assistant\nYo<|im_end|>"]},
            "query[0].prompt[0].role",
        ),
        (
            "/get_reward",
            {"query": ["<|im_start|>user\n" + "x" * 40_000 + "<|im_end|><|im_start|>assistant\nYo"]},
            "query[0].prompt[0].content",
        ),
        ("/get_reward", {"query": [GOOD + " " * 70_000]}, "body"),
        ("/classify", {}, "input"),
        ("/classify", {"input": GOOD, "messages": [{"role": "user", "content": "x"}]}, "input"),
        ("/classify", {"input": [1, 2, 3]}, "input[0]"),  # token ids, decoded: no conversation in them
        ("/classify", {"input": [[1, 2], [-1]]}, "input[1]"),
        ("/classify", {"input": [[1, 2], [10**9]]}, "input[1]"),
        ("/classify", {"input": [[1, 2], []]}, "input[1]"),
        ("/pooling", {"input": GOOD, "task": "token_classify"}, "task"),
        ("/pooling", {"input": GOOD, "encoding_format": "bytes"}, "encoding_format"),
        ("/classify", {"input": 5}, "input"),
        ("/classify", {"input": GOOD, "use_activation": "no"}, "use_activation"),
        ("/classify", {"messages": []}, "messages"),
        ("/classify", {"messages": "hi"}, "messages"),
        ("/classify", {"messages": [{"role": "user", "content": "Hi"}]}, "messages[0].role"),
        ("/classify", {"messages": [{"role": "user", "content": "Hi"}, "x"]}, "messages[1]"),
        ("/classify", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0].content"),
        (
            "/pooling",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "messages[0].content[0]",
        ),
        (
            "/pooling",
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
            "messages[0].content",
        ),
        (
            "/pooling",
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
            "messages[1].content",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(srv, path, body, field):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(_url(srv, path), content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert _message(r).startswith(field + ":"), r.json()
    if path != "/get_reward":  # vLLM's routes answer vLLM's ErrorResponse
        assert r.json()["error"] | {"message": ""} == {
            "message": "",
            "type": "BadRequestError",
            "param": field,
            "code": 400,
        }
    else:
        assert r.json()["status"] == 400


def test_unknown_routes_and_methods_and_the_labeling_page_without_a_store(srv):
    assert httpx.get(_url(srv, "/get_reward")).status_code == 405
    assert httpx.post(_url(srv, "/score"), json={}).status_code == 404
    for path in ("/", "/api/next", "/admin"):  # no store in this process: no labeling page
        assert httpx.get(_url(srv, path)).status_code == 404
    r = httpx.get(_url(srv, "/health"))
    health = r.json()
    assert r.status_code == 200 and health["status"] == "SERVING"
    models = health["models"]  # the served version with its measured weights; no failed load
    assert list(models["loaded"]) == [models["default"]] and models["load_failures"] == {}
    assert models["loaded"][models["default"]]["weight_bytes"] > 0


def test_scorer_token_and_metrics_as_on_grpc(home, tiny_rm_dir):
    entries = ",".join(f"{role}:{token}" for role, token in TOKENS.items())
    from pydantic import SecretStr

    server = ServerThread(
        ServeSettings(port=0, http_port=0, model=str(tiny_rm_dir), precision="fp32", metrics_port=-1),
        security=SecuritySettings(
            tokens=SecretStr(entries), tokens_file=None, tls_cert=None, tls_key=None, tls_client_ca=None
        ),
    )
    try:
        url = f"http://127.0.0.1:{server.server.http.port}"
        body = {"query": [GOOD]}
        missing = httpx.post(url + "/get_reward", json=body, timeout=60)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        denied = httpx.post(
            url + "/get_reward", json=body, headers={"Authorization": f"Bearer {TOKENS['labeler']}"}, timeout=60
        )
        assert denied.status_code == 403 and "needs the scorer or admin role" in denied.json()["error"]
        for role in ("scorer", "admin"):
            ok = httpx.post(
                url + "/get_reward", json=body, headers={"Authorization": f"Bearer {TOKENS[role]}"}, timeout=60
            )
            assert ok.status_code == 200, ok.text
        bad = httpx.post(
            url + "/classify", json={}, headers={"Authorization": f"Bearer {TOKENS['scorer']}"}, timeout=60
        )
        assert bad.status_code == 400
        assert httpx.get(url + "/health").status_code == 200  # probes need no token
        value = server.server.metrics.registry.get_sample_value
        assert value("rm_http_requests_total", {"route": "/get_reward", "status": "200"}) == 2
        assert value("rm_http_requests_total", {"route": "/get_reward", "status": "401"}) == 1
        assert value("rm_http_requests_total", {"route": "/get_reward", "status": "403"}) == 1
        assert value("rm_http_requests_total", {"route": "/classify", "status": "400"}) == 1
        assert value("rm_http_requests_total", {"route": "/health", "status": "200"}) == 1
        assert value("rm_http_request_seconds_count", {"route": "/get_reward"}) == 4
        assert (
            value("rm_scores_total", {"version": server.server.served.default}) >= 2
        )  # the batcher's own counters saw the items
        # The same registry on the HTTP port (vLLM's and TEI's place for it), open like the metrics port.
        scraped = httpx.get(url + "/metrics", timeout=60)
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        assert 'rm_http_requests_total{route="/get_reward",status="200"} 2.0' in scraped.text
    finally:
        server.stop()


def test_overload_is_429_at_once_with_retry_after(stalled_server):
    srv, _, stall, _ = stalled_server(max_inflight_items=2, http_port=0)
    url = f"http://127.0.0.1:{srv.server.http.port}/get_reward"
    held = {}
    first = threading.Thread(
        target=lambda: held.setdefault("r", httpx.post(url, json={"query": [GOOD, GOOD]}, timeout=60))
    )
    first.start()
    wait_until(lambda: stall.batches)  # the first request's items are at the (stalled) model
    r = httpx.post(url, json={"query": [GOOD]}, timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "items in flight" in r.json()["error"]
    stall.release()
    first.join(60)
    assert held["r"].status_code == 200


def _health(address: str, service: str = ""):
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        )


def test_while_the_model_loads_score_is_unavailable_and_health_not_serving(home, tiny_rm_dir, monkeypatch):
    from rm_service.server import app as server_app
    from rm_service.server.app import RewardServer

    gate, real = threading.Event(), server_app.load_for_serving
    monkeypatch.setattr(
        server_app, "load_for_serving", lambda *a: (gate.wait(60), real(*a))[1]
    )  # the real load, held back
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = RewardServer(ServeSettings(port=0, http_port=0, model=str(tiny_rm_dir), precision="fp32", metrics_port=-1))
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        wait_until(lambda: server.http is not None and server.http.port)
        address, url = f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.http.port}"
        assert _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(address, "rm.v1.RewardService") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (
            _health(address, "rm.v1.PreferenceService") == health_pb2.HealthCheckResponse.SERVING
        )  # the store works already
        with pytest.raises(grpc.RpcError) as err:
            _grpc_scores(address, CONVERSATIONS[:1])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in err.value.details()
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json() == {
            "status": "NOT_SERVING",
            "reason": "loading the reward model",
            "models": {"default": None, "loaded": {}, "load_failures": {}},  # nothing loaded yet, nothing failed
        }
        early = httpx.post(url + "/get_reward", json={"query": [GOOD]}, timeout=60)
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        gate.set()
        started.result(300)
        assert _health(address) == _health(address, "rm.v1.RewardService") == health_pb2.HealthCheckResponse.SERVING
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/get_reward", json={"query": [GOOD]}, timeout=60).status_code == 200
        assert len(_grpc_scores(address, CONVERSATIONS[:1]).results) == 1
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_store_only_process_reports_only_its_services(home):
    server = ServerThread(ServeSettings(port=0, http_port=0, with_model=False, metrics_port=-1))
    try:
        assert (
            _health(server.address)
            == _health(server.address, "rm.v1.PreferenceService")
            == health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.RpcError) as err:
            _health(server.address, "rm.v1.RewardService")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # not served here: never SERVING
        url = f"http://127.0.0.1:{server.server.http.port}"
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
        assert httpx.post(url + "/get_reward", json={"query": [GOOD]}).status_code == 404  # no model, no reward routes
    finally:
        server.stop()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
PIECES = st.sampled_from(
    ["<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n", " ", "Hi", "<pad>", "x" * 50, "\ud800", ""]
)
CHATML = st.lists(PIECES, max_size=12).map("".join)


@settings(max_examples=60, deadline=None)
@given(
    path=st.sampled_from(["/get_reward", "/classify", "/pooling"]),
    body=st.dictionaries(
        st.sampled_from(["query", "prompts", "labels", "input", "messages", "use_activation", "model"]),
        JSON | st.lists(CHATML, min_size=1, max_size=3) | CHATML,
        max_size=4,
    ),
)
def test_any_body_is_answered_200_or_400_never_500(srv, path, body):
    r = httpx.post(_url(srv, path), content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code in (200, 400), r.text
    assert r.status_code == 200 or ":" in _message(r)  # a 400 names its field


def test_a_caller_that_disconnects_has_its_items_dropped_before_the_model(stalled_server):
    srv, _, stall, _ = stalled_server(http_port=0)
    url = f"http://127.0.0.1:{srv.server.http.port}/get_reward"
    held = {}
    first = threading.Thread(
        target=lambda: held.setdefault("r", httpx.post(url, json={"query": [GOOD, GOOD]}, timeout=60))
    )
    first.start()
    wait_until(lambda: stall.batches)  # the first request's batch holds the (stalled) model
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            url, json={"query": [GOOD] * 3}, timeout=1.0
        )  # queued behind it; the caller gives up and disconnects
    value = srv.server.metrics.registry.get_sample_value
    wait_until(lambda: value("rm_http_requests_total", {"route": "/get_reward", "status": "499"}) == 1)
    assert (
        srv.server.batcher.inflight_items == 2
    )  # its permit is released at once: only the first request's items remain
    stall.release()
    first.join(60)
    assert held["r"].status_code == 200
    assert stall.batches == [2]  # the three items of the caller who left never reached the model
