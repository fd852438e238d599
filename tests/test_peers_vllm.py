"""vLLM's routes (/classify, /pooling, GET /v1/models) against vLLM 0.33.0's own pydantic protocol
models, not an imitation of them: a real server with tokens answers the requests vLLM's clients
send (verl's reward loop, the chat form, token ids, base64, activation on and off) and the bad ones
they may send; tests/vllm_protocol.py, in a subprocess, validates each request with vLLM's request
model and each answer with its response model (every 200) or its ErrorResponse (every error),
allowing no key vLLM does not declare.

vLLM comes from `make peers-vllm` (called by `make install`): its released wheel, of which only
the Python sources are unpacked into .venv/peers/vllm, beside the light packages its protocol
modules import; the test skips, naming the command, without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ServerThread, peer_folder
from labeling import TOKENS
from pydantic import SecretStr

from rm_service.settings import SecuritySettings, ServeSettings

VLLM = peer_folder("vllm")
CHECK = Path(__file__).with_name("vllm_protocol.py")
pytestmark = pytest.mark.skipif(
    not (VLLM / "vllm" / "entrypoints" / "pooling" / "classify" / "protocol.py").exists(),
    reason=f"vLLM 0.33.0's sources are not in {VLLM}: run `make peers-vllm`",
)

CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix, knead, bake."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": [{"type": "text", "text": "Apple."}]},  # content as text parts
    ],
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_rm_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("RM_HOME", str(tmp_path_factory.mktemp("home")))
    tokens = ",".join(f"{role}:{token}" for role, token in TOKENS.items())
    security = SecuritySettings(
        tokens=SecretStr(tokens), tokens_file=None, tls_cert=None, tls_key=None, tls_client_ca=None
    )
    settings = ServeSettings(
        port=0, http_port=0, model=str(tiny_rm_dir), precision="fp32", with_store=False, metrics_port=-1
    )
    server = ServerThread(settings, security=security)
    yield server
    server.stop()
    mp.undo()


def _exchanges(srv, tiny_tokenizer) -> list[dict]:
    """(request, expected status) of each case, sent to the server; the answers recorded."""
    texts = [tiny_tokenizer.apply_chat_template(_plain(c), tokenize=False) for c in CONVERSATIONS]
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    version = srv.server.served.default
    ok = [
        ("/classify", {"model": "/models/rm", "input": texts[0], "activation": False}),  # verl's reward loop
        ("/v1/classify", {"input": texts}),
        ("/classify", {"input": ids[0], "use_activation": False}),
        ("/classify", {"input": ids, "truncate_prompt_tokens": -1, "add_special_tokens": False}),
        ("/classify", {"model": version, "messages": CONVERSATIONS[1], "use_activation": True}),
        ("/pooling", {"input": texts, "use_activation": False}),
        ("/v1/pooling", {"input": texts, "encoding_format": "base64"}),
        ("/pooling", {"input": texts[1], "task": "classify", "encoding_format": "float"}),
        ("/pooling", {"messages": CONVERSATIONS[0], "user": "someone"}),
    ]
    bad = [  # (path, body, status, whether vLLM itself would accept the request)
        ("/classify", {"input": "no turn marker at all"}, 400, True),
        ("/classify", {"input": [[10**9]]}, 400, True),
        ("/pooling", {"input": texts[0], "task": "token_classify"}, 400, True),
        ("/pooling", {"input": texts[0], "encoding_format": "bytes"}, 400, True),
        ("/v1/classify", {"messages": [{"role": "user", "content": "Hi"}]}, 400, True),
        ("/classify", {}, 400, False),
    ]
    scorer = {"Authorization": f"Bearer {TOKENS['scorer']}"}
    url = f"http://127.0.0.1:{srv.server.http.port}"
    out = []
    with httpx.Client(base_url=url, headers=scorer, timeout=60) as client:
        for path, body in ok:
            out.append(_record(client.post(path, json=body), path, body, True, 200))
        for path, body, status, accepts in bad:
            out.append(_record(client.post(path, json=body), path, body, accepts, status))
        out.append(_record(client.get("/v1/models"), "/v1/models", None, True, 200))
        out.append(_record(client.get("/classify"), "/classify", None, True, 405))
        out.append(_record(client.post("/v1/embeddings", json={"input": "x"}), "/v1/embeddings", None, True, 404))
        body = {"input": texts[0]}
        out.append(
            _record(client.post("/classify", json=body, headers={"Authorization": ""}), "/classify", body, True, 401)
        )
        labeler = {"Authorization": f"Bearer {TOKENS['labeler']}"}
        out.append(_record(client.post("/pooling", json=body, headers=labeler), "/pooling", body, True, 403))
        out.append(_record(client.get("/v1/models", headers={"Authorization": ""}), "/v1/models", None, True, 401))
    return out


def _plain(conversation: list[dict]) -> list[dict]:
    return [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
        for m in conversation
    ]


def _record(r: httpx.Response, path: str, body, accepts: bool, expected: int) -> dict:
    assert r.status_code == expected, (path, body, r.status_code, r.text)
    kind = "models" if path == "/v1/models" else "pooling" if "pooling" in path else "classify"
    return {
        "kind": kind,
        "path": path,
        "request": body,
        "vllm_accepts": accepts,
        "status": r.status_code,
        "answer": r.json(),
    }


# Answers vLLM's models must refuse, so the check is known not to be vacuous: a wrong type, a missing field,
# an undeclared key, rm-service's own (non-vLLM) error shape, and a request vLLM refuses.
_GOOD = {"index": 0, "label": "reward", "probs": [0.5], "num_classes": 1}
_ANSWER = {"id": "classify-1", "object": "list", "created": 1, "model": "v1", "data": [_GOOD], "usage": {}}
CANARIES = [
    ({"data": [_GOOD | {"probs": "0.5"}]}, None, 200, "probs"),
    ({"model": None}, None, 200, "model"),
    ({"data": [_GOOD | {"reward": 1.0}]}, None, 200, "declares no data[0].reward"),
    ({"error": "input: bad", "status": 400}, None, 400, "ErrorResponse"),
    ({}, {"input": "x", "normalize": True}, 200, "`normalize` was removed"),
]


def _canaries() -> list[dict]:
    return [
        {
            "kind": "classify",
            "request": request,
            "vllm_accepts": True,
            "status": status,
            "answer": answer if status != 200 else _ANSWER | answer,
        }
        for answer, request, status, _ in CANARIES
    ]


def test_every_answer_validates_against_vllms_own_protocol_models(srv, tiny_tokenizer, tmp_path):
    exchanges = _exchanges(srv, tiny_tokenizer)
    assert sum(e["status"] == 200 for e in exchanges) == 10 and len(exchanges) == 21
    (tmp_path / "exchanges.json").write_text(json.dumps(exchanges + _canaries()))
    run = subprocess.run(
        [sys.executable, str(CHECK), str(VLLM), str(tmp_path / "exchanges.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "vllm 0.33.0 from " + str(VLLM) in run.stderr  # vLLM's released code, not anything else on the path
    found = json.loads(run.stdout)
    assert found[: len(exchanges)] == [[]] * len(exchanges), [f for f in found if f]
    for problems, (_, _, _, expected) in zip(found[len(exchanges) :], CANARIES, strict=True):
        assert len(problems) == 1 and expected in problems[0], problems
