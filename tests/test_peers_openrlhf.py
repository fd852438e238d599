"""OpenRLHF's own released reward client (openrlhf 0.11.2, installed by `make install` into
.venv/peers/openrlhf without its heavy dependencies) against a real server bound for other hosts
(0.0.0.0: tokens required) over TLS: the scorer token travels in the URL, as HTTP Basic (the only
credentials OpenRLHF's client can send), and renders of ChatML, Llama 3, Mistral and Gemma get the
rewards gRPC Score gives their messages."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import ServerThread, peer
from labeling import TOKENS
from pydantic import SecretStr

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.conversation import Message
from rm_service.settings import SecuritySettings, ServeSettings

peer("openrlhf", "openrlhf")
CLIENT = Path(__file__).with_name("openrlhf_client.py")

PROMPT = [Message("system", "You are terse."), Message("user", "Name a fruit."), Message("assistant", "Apple.")]
PROMPT += [Message("user", "Another one?")]
REPLY = "Banana, or a pear."
# The same conversation as each template renders it and OpenRLHF decodes it (special tokens kept,
# the reply's end marker there or cut at the generation limit).
RENDERS = {
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
    "<|im_start|>assistant\nApple.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n"
    f"<|im_start|>assistant\n{REPLY}<|im_end|>",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nName a fruit.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nApple.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>"
    f"<|start_header_id|>assistant<|end_header_id|>\n\n{REPLY}",
    "mistral": "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Name a fruit.[/INST]Apple.</s>"
    f"[INST]Another one?[/INST]{REPLY}</s>",
}
GEMMA = [Message("user", "Name a fruit."), Message("assistant", "Apple."), Message("user", "Another one?")]
GEMMA_RENDER = (
    "<bos><start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\nApple.<end_of_turn>\n"
    f"<start_of_turn>user\nAnother one?<end_of_turn>\n<start_of_turn>model\n{REPLY}<end_of_turn>\n"
)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tiny_rm_dir, pki):
    """Bound on 0.0.0.0 (so tokens are required), TLS from the throwaway CA, HTTP beside gRPC."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RM_HOME", str(tmp_path_factory.mktemp("home")))
    tokens = ",".join(f"{role}:{token}" for role, token in TOKENS.items())
    security = SecuritySettings(
        tokens=SecretStr(tokens),
        tokens_file=None,
        tls_cert=pki / "server.crt",
        tls_key=pki / "server.key",
        tls_client_ca=None,
    )
    settings = ServeSettings(
        host="0.0.0.0", port=0, http_port=0, model=str(tiny_rm_dir), precision="fp32", with_store=False, metrics_port=-1
    )
    server = ServerThread(settings, security=security)
    yield server
    server.stop()
    mp.undo()


def _grpc_rewards(srv, pki: Path, conversations: list[tuple[list[Message], str]]) -> list[float]:
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes()),
        grpc.access_token_call_credentials(TOKENS["scorer"]),
    )
    items = [
        reward_pb2.ScoreItem(
            id=str(i), prompt=[common_pb2.Message(role=m.role, content=m.content) for m in p], completion=c
        )
        for i, (p, c) in enumerate(conversations)
    ]
    with grpc.secure_channel(srv.address, creds) as channel:
        response = reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(items=items), timeout=60)
    return [x.reward for x in response.results]


def _openrlhf(url: str, pki: Path, queries: list[str]) -> subprocess.CompletedProcess:
    request = {"query": queries, "prompts": [""] * len(queries), "labels": [None] * len(queries)}
    return subprocess.run(
        [sys.executable, str(CLIENT), url],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        env={"SSL_CERT_FILE": str(pki / "ca.crt"), "PATH": "/usr/bin:/bin"},
    )


def test_openrlhf_with_the_token_in_its_url_over_tls_gets_grpc_rewards_for_each_template(remote, pki):
    port = remote.server.http.port
    assert remote.server.http.scheme == "https"
    queries = [*RENDERS.values(), GEMMA_RENDER]
    done = _openrlhf(f"https://openrlhf:{TOKENS['scorer']}@127.0.0.1:{port}/get_reward", pki, queries)
    assert done.returncode == 0, done.stderr[-3000:]
    [answer] = json.loads(done.stdout)  # one server: one shard
    expected = _grpc_rewards(remote, pki, [(PROMPT, REPLY)] * len(RENDERS) + [(GEMMA, REPLY)])
    assert answer["rewards"] == pytest.approx(expected, abs=1e-5)
    assert answer["rewards"][0] != answer["rewards"][-1]  # Gemma folds no system turn: another conversation


def test_basic_credentials_carry_the_token_and_its_role(remote, pki):
    url = f"https://127.0.0.1:{remote.server.http.port}/get_reward"
    body = {"query": [RENDERS["chatml"]]}
    with httpx.Client(verify=ssl.create_default_context(cafile=pki / "ca.crt"), timeout=60) as c:
        assert c.post(url, json=body, auth=("anyone", TOKENS["scorer"])).status_code == 200
        assert c.post(url, json=body, auth=("", TOKENS["admin"])).status_code == 200
        denied = c.post(url, json=body, auth=("openrlhf", TOKENS["labeler"]))
        assert denied.status_code == 403 and "needs the scorer or admin role" in denied.json()["error"]
        wrong = c.post(url, json=body, auth=("openrlhf", "not-a-token"))
        assert wrong.status_code == 401 and wrong.json()["error"].endswith("invalid bearer token")
        missing = c.post(url, json=body)
        assert missing.status_code == 401 and "HTTP Basic with the token as password" in missing.json()["error"]
        for header in ("Basic !!!not-base64", "Basic " + "bm8tY29sb24="):  # malformed; no colon, so no password
            assert c.post(url, json=body, headers={"Authorization": header}).status_code == 401
    with pytest.raises(
        (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)
    ):  # plaintext to the TLS port never gets an answer
        httpx.post(url.replace("https", "http"), json=body, auth=("x", TOKENS["scorer"]), timeout=10)
