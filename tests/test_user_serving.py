"""SimulateUser over gRPC and HTTP on real servers with tiny models: batching, determinism,
validation, admission, deadline, cancellation, auth, the version on every reply, hot-swap."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import ServerThread, Stall, store_with_hh, wait_until

from rm_client import UserClient
from rm_client.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc, user_pb2, user_pb2_grpc
from rm_service.settings import SecuritySettings, ServeSettings

CONVS = [
    [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "I can't help with that."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! What can I do for you?"},
        {"role": "user", "content": "Tell me about rivers."},
        {"role": "assistant", "content": "Rivers carry water to the sea."},
    ],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
]


def _serve(tiny_rm_dir, user_model, security=None, **kw) -> ServerThread:
    base = dict(
        port=0, model=str(tiny_rm_dir), metrics_port=-1, http_port=0, precision="fp32", user_model=str(user_model)
    )
    return ServerThread(ServeSettings(**{"with_store": False, **base, **kw}), security=security)


def _conv(messages) -> user_pb2.Conversation:
    return user_pb2.Conversation(messages=[common_pb2.Message(**m) for m in messages])


@pytest.fixture
def user_server(home, tiny_rm_dir, tiny_lm_dir):
    srv = _serve(tiny_rm_dir, tiny_lm_dir)
    yield srv
    srv.stop()


def _post(srv, path, body, token=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(srv.server.http.url.rstrip("/") + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_simulate_user_is_batched_deterministic_and_names_its_version(user_server, tiny_lm_dir):
    with UserClient(user_server.address) as users:
        first = users.simulate(CONVS * 3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=11)
        again = users.simulate(CONVS * 3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=11)
        other = users.simulate(CONVS * 3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=12)
        greedy = [users.simulate(CONVS, temperature=0.0, max_new_tokens=8, seed=s) for s in (1, 2)]
    assert len(first) == 9 and first.version == tiny_lm_dir.name and first.seed == 11
    assert first == again  # the same call, the same seed: the same turns
    assert other.turns != first.turns
    assert greedy[0].turns == greedy[1].turns  # greedy ignores the seed
    for i, turn in enumerate(first.turns):
        assert (turn is None) == (first.num_tokens[i] == 0)
        assert 0 <= first.num_tokens[i] <= 8 and 0.0 <= first.end_probability[i] <= 1.0
    # the untuned tiny model rarely ends a conversation: most rows sampled a turn
    assert sum(t is not None for t in first.turns) >= 6
    stub = user_pb2_grpc.UserServiceStub(grpc.insecure_channel(user_server.address))
    reply = stub.SimulateUser(user_pb2.SimulateUserRequest(conversations=[_conv(CONVS[0])]), timeout=30)
    assert reply.model_version == tiny_lm_dir.name and reply.seed > 0 and len(reply.results) == 1


def test_http_route_shares_the_grpc_path(user_server):
    with UserClient(user_server.address) as users:
        grpc_result = users.simulate(CONVS, max_new_tokens=6, seed=5)
    status, body = _post(
        user_server, "/simulate_user", {"conversations": CONVS, "max_new_tokens": 6, "seed": 5, "temperature": 1.0}
    )
    assert status == 200, body
    assert [None if r["ended"] else r["content"] for r in body["results"]] == grpc_result.turns
    assert body["model_version"] == grpc_result.version and body["seed"] == 5
    status, body = _post(user_server, "/simulate_user", {"conversations": [CONVS[0][:1]]})
    assert status == 400 and "must end with an assistant turn" in body["error"]
    status, body = _post(user_server, "/simulate_user", {"conversations": CONVS, "top_p": 0})
    assert status == 400 and body["error"].startswith("top_p")
    status, body = _post(user_server, "/simulate_user", {"conversations": "hello"})
    assert status == 400 and body["error"].startswith("conversations")


@pytest.mark.parametrize(
    "request_kw, field",
    [
        (dict(conversations=[]), "conversations"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=100000), "max_new_tokens"),
        (dict(model_version="u99"), None),
    ],
)
def test_bad_requests_name_the_field(user_server, request_kw, field):
    stub = user_pb2_grpc.UserServiceStub(grpc.insecure_channel(user_server.address))
    convs = [_conv(CONVS[0])]
    request = user_pb2.SimulateUserRequest(**{"conversations": convs, **request_kw})
    with pytest.raises(grpc.RpcError) as err:
        stub.SimulateUser(request, timeout=30)
    if field is None:
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "user model version 'u99'" in err.value.details()
    else:
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)


def _stalled(tiny_rm_dir, tiny_lm_dir, **kw):
    """A server whose reward model stalls every batch: a Score call holds the model thread."""
    srv = _serve(tiny_rm_dir, tiny_lm_dir, **kw)
    served = srv.server.served.get()
    stall = served.backend = Stall(served.backend)
    forwards = []
    user_model = srv.server.served_users.get().runtime.inference_model()
    user_model.register_forward_pre_hook(lambda *a: forwards.append(1))
    return srv, stall, forwards


def _hold_model_thread(srv):
    """Start a Score call that stalls on the model thread; returns its future."""
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(srv.address))
    item = reward_pb2.ScoreItem(prompt=[common_pb2.Message(role="user", content="Hi")], completion="Hello")
    return stub.Score.future(reward_pb2.ScoreRequest(items=[item]), timeout=60)


def test_admission_deadline_and_cancellation(home, tiny_rm_dir, tiny_lm_dir):
    srv, stall, forwards = _stalled(tiny_rm_dir, tiny_lm_dir, max_inflight_items=4)
    try:
        held = _hold_model_thread(srv)
        wait_until(lambda: stall.batches)
        stub = user_pb2_grpc.UserServiceStub(grpc.insecure_channel(srv.address))
        convs = [_conv(c) for c in CONVS]
        with pytest.raises(grpc.RpcError) as err:  # 1 in flight + 4 > 4: refused at once
            stub.SimulateUser(user_pb2.SimulateUserRequest(conversations=convs + convs[:1]), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:  # admitted, then its deadline passes in the queue
            stub.SimulateUser(user_pb2.SimulateUserRequest(conversations=convs[:1]), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        cancelled = stub.SimulateUser.future(user_pb2.SimulateUserRequest(conversations=convs[:2]), timeout=30)
        wait_until(lambda: srv.server.batcher.inflight_items == 3)
        cancelled.cancel()
        wait_until(lambda: srv.server.batcher.inflight_items == 1)
        stall.release()
        held.result()
        time.sleep(0.3)
        assert forwards == []  # neither the late call nor the cancelled one reached the user model
        reply = stub.SimulateUser(user_pb2.SimulateUserRequest(conversations=convs[:1], max_new_tokens=2), timeout=30)
        assert len(reply.results) == 1 and forwards
        assert srv.server.batcher.inflight_items == 0 and srv.server.batcher.queued_tokens == 0
    finally:
        stall.release()
        srv.stop()


def test_auth_roles(home, tiny_rm_dir, tiny_lm_dir):
    tokens = "scorer:" + "s" * 20 + ",labeler:" + "l" * 20
    srv = _serve(tiny_rm_dir, tiny_lm_dir, security=SecuritySettings(tokens=tokens))
    try:
        with UserClient(srv.address, token="s" * 20, max_retries=0) as users:
            assert len(users.simulate(CONVS[:1], max_new_tokens=2, seed=1)) == 1
        for token, code in (("l" * 20, "PERMISSION_DENIED"), (None, "UNAUTHENTICATED")):
            with UserClient(srv.address, token=token, max_retries=0) as users, pytest.raises(Exception) as err:
                users.simulate(CONVS[:1], max_new_tokens=2)
            assert err.value.code == code
        assert _post(srv, "/simulate_user", {"conversations": CONVS[:1], "max_new_tokens": 2}, "s" * 20)[0] == 200
        assert _post(srv, "/simulate_user", {"conversations": CONVS[:1]}, "l" * 20)[0] == 403
        assert _post(srv, "/simulate_user", {"conversations": CONVS[:1]})[0] == 401
    finally:
        srv.stop()


def test_hot_swap_follows_the_promoted_user_model(home, tmp_path, tiny_rm_dir, tiny_lm_dir):
    """Two user versions trained on the store; the server serves the promoted one and switches
    when the other is promoted, while a call pinned to the old one is still answered by it."""
    from rm_service import registry
    from rm_service.usermodel.run import train_user_model
    from rm_service.usermodel.settings import UserModelSettings

    store = store_with_hh(tmp_path, 80)
    settings = UserModelSettings(
        backbone=str(tiny_lm_dir),
        method="full",  # the default (lora) is trained in test_user_model
        max_minutes=0.1,
        epochs=0.5,
        device="cpu",
        precision="fp32",
        learning_rate=1e-3,
    )
    first = train_user_model(store, settings, show_progress=False)
    assert first.promoted and first.version == "u1"
    srv = ServerThread(
        ServeSettings(
            port=0,
            model=str(tiny_rm_dir),
            with_store=False,
            metrics_port=-1,
            precision="fp32",
            user_model="promoted",
            watch_interval_s=0.1,
        ),
    )
    try:
        with UserClient(srv.address) as users:
            assert users.simulate(CONVS, max_new_tokens=2, seed=0).version == "u1"
            second = train_user_model(
                store, settings.model_copy(update={"promote": False, "seed": 1}), show_progress=False
            )
            assert second.version == "u2"
            ok, why = registry.promote(store, "u2", force=True)
            assert ok, why
            wait_until(lambda: srv.server.served_users.default == "u2", timeout=60)
            assert users.simulate(CONVS, max_new_tokens=2, seed=0).version == "u2"
            assert users.simulate(CONVS, max_new_tokens=2, seed=0, version="u1").version == "u1"  # still loaded
        assert [r.version for r in registry.list_models(store)] == []  # reward kinds untouched
        assert [(r.version, r.status) for r in registry.list_models(store, "user")] == [
            ("u1", "retired"),
            ("u2", "promoted"),
        ]
    finally:
        srv.stop()
        store.close()
