"""Bearer tokens with roles, TLS and mutual TLS, and the non-loopback bind rule, on real servers."""

from __future__ import annotations

import functools
import logging
import secrets
from pathlib import Path

import grpc
import pytest
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rm_service.api.v1 import (
    common_pb2,
    preference_pb2,
    preference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from rm_service.errors import FailedPrecondition
from rm_service.settings import SecuritySettings, ServeSettings

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
TOKENS = {role: f"{role}-{secrets.token_urlsafe(24)}" for role in ("scorer", "labeler", "admin")}
PROMPT = [common_pb2.Message(role="user", content="How do I bake bread?")]
SCORE = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(id="a", prompt=PROMPT, completion="Knead, rise, bake.")])


@pytest.fixture(autouse=True)
def _no_auth_env(monkeypatch):
    for var in (
        "RM_AUTH_TOKENS",
        "RM_AUTH_TOKENS_FILE",
        "RM_AUTH_TLS_CERT",
        "RM_AUTH_TLS_KEY",
        "RM_AUTH_TLS_CLIENT_CA",
    ):
        monkeypatch.delenv(var, raising=False)


def _tokens_file(directory: Path) -> Path:
    path = directory / "tokens"
    path.write_text("# role:token\n" + "".join(f"{role}:{token}\n" for role, token in TOKENS.items()))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, tiny_rm_dir):
    """One server with a store and the three tokens (from RM_AUTH_TOKENS_FILE) for the whole matrix."""
    tmp = tmp_path_factory.mktemp("auth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RM_HOME", str(tmp / "home"))
        for var in (
            "RM_STORE_PATH",
            "RM_MODELS_ARTIFACTS_DIR",
            "RM_MODELS_CACHE_DIR",
            "RM_SERVE_MODEL",
            "RM_AUTH_TOKENS",
        ):
            mp.delenv(var, raising=False)
        mp.setenv("RM_AUTH_TOKENS_FILE", str(_tokens_file(tmp)))
        srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), metrics_port=-1))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(auth_server):
    with grpc.insecure_channel(auth_server.address) as ch:
        yield ch


def _label(i: int) -> preference_pb2.Label:
    return preference_pb2.Label(
        label_id=f"l-{i}-{secrets.token_hex(4)}",
        prompt=PROMPT,
        responses=["Knead it.", "No idea."],
        ranks=[0, 1],
        source=preference_pb2.HUMAN,
        annotator="t",
    )


CALLS = {
    "Score": lambda ch, md: reward_pb2_grpc.RewardServiceStub(ch).Score(SCORE, metadata=md, timeout=30),
    "ListModels": lambda ch, md: reward_pb2_grpc.RewardServiceStub(ch).ListModels(
        reward_pb2.ListModelsRequest(), metadata=md, timeout=30
    ),
    "IngestLabels": lambda ch, md: preference_pb2_grpc.PreferenceServiceStub(ch).IngestLabels(
        preference_pb2.IngestLabelsRequest(labels=[_label(0)]), metadata=md, timeout=30
    ),
    "GetStats": lambda ch, md: preference_pb2_grpc.PreferenceServiceStub(ch).GetStats(
        preference_pb2.GetStatsRequest(), metadata=md, timeout=30
    ),
    # An invalid mode: past authentication it is INVALID_ARGUMENT, and no training job starts.
    "RequestRetrain": lambda ch, md: training_pb2_grpc.TrainingServiceStub(ch).RequestRetrain(
        training_pb2.RetrainRequest(mode="bogus"), metadata=md, timeout=30
    ),
}
ALLOWED_RETRAIN = grpc.StatusCode.INVALID_ARGUMENT  # past auth, the request itself is refused
MATRIX = {
    None: {"Score": UNAUTH, "ListModels": UNAUTH, "IngestLabels": UNAUTH, "GetStats": UNAUTH, "RequestRetrain": UNAUTH},
    "bad": {
        "Score": UNAUTH,
        "ListModels": UNAUTH,
        "IngestLabels": UNAUTH,
        "GetStats": UNAUTH,
        "RequestRetrain": UNAUTH,
    },
    "scorer": {"Score": OK, "ListModels": OK, "IngestLabels": DENIED, "GetStats": DENIED, "RequestRetrain": DENIED},
    "labeler": {"Score": DENIED, "ListModels": DENIED, "IngestLabels": OK, "GetStats": OK, "RequestRetrain": DENIED},
    "admin": {"Score": OK, "ListModels": OK, "IngestLabels": OK, "GetStats": OK, "RequestRetrain": ALLOWED_RETRAIN},
}


def _metadata(who: str | None):
    if who is None:
        return None
    token = TOKENS.get(who, "not-a-configured-token-" + secrets.token_hex(8))
    return (("authorization", f"Bearer {token}"),)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()
    return OK


@pytest.mark.parametrize("who", list(MATRIX), ids=lambda w: str(w))
def test_auth_matrix(channel, who):
    got = {name: _code(functools.partial(call, channel, _metadata(who))) for name, call in CALLS.items()}
    assert got == MATRIX[who]


def test_refusals_name_the_problem_and_never_echo_the_token(channel):
    stub = preference_pb2_grpc.PreferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetStats(preference_pb2.GetStatsRequest(), timeout=30)
    assert err.value.code() == UNAUTH and "authorization: Bearer" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetStats(preference_pb2.GetStatsRequest(), metadata=(("authorization", "Basic dXNlcjpwYXNz"),), timeout=30)
    assert err.value.code() == UNAUTH
    with pytest.raises(grpc.RpcError) as err:
        stub.GetStats(preference_pb2.GetStatsRequest(), metadata=_metadata("scorer"), timeout=30)
    assert err.value.code() == DENIED and "scorer" in err.value.details() and "labeler" in err.value.details()
    assert TOKENS["scorer"] not in err.value.details()


def test_streaming_methods_are_guarded_too(channel):
    stream = reward_pb2_grpc.RewardServiceStub(channel).WatchModels(reward_pb2.WatchModelsRequest(), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        next(iter(stream))
    assert err.value.code() == UNAUTH


def test_health_and_reflection_need_no_token(channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    assert "rm.v1.RewardService" in {s.name for r in responses for s in r.list_services_response.service}


def test_tokens_never_reach_the_logs(channel, caplog):
    caplog.set_level(logging.DEBUG)
    for who in MATRIX:
        for call in CALLS.values():
            _code(functools.partial(call, channel, _metadata(who)))
    bad = "not-a-configured-token-0123456789"
    _code(lambda: CALLS["Score"](channel, (("authorization", f"Bearer {bad}"),)))
    refusals = [r for r in caplog.records if r.name == "rm_service.server.auth"]
    assert refusals and all("peer" in r.__dict__ and "method" in r.__dict__ for r in refusals)
    for secret in [*TOKENS.values(), bad]:
        assert secret not in caplog.text
        assert all(secret not in str(r.__dict__) for r in caplog.records)


# --- TLS and mutual TLS ------------------------------------------------------------------------


def _tls_server(monkeypatch, tiny_rm_dir, pki: Path, mutual: bool, tokens: str | None = None) -> ServerThread:
    """A TLS server configured through the environment (RM_AUTH_TLS_*, RM_AUTH_TOKENS)."""
    monkeypatch.setenv("RM_AUTH_TLS_CERT", str(pki / "server.crt"))
    monkeypatch.setenv("RM_AUTH_TLS_KEY", str(pki / "server.key"))
    if mutual:
        monkeypatch.setenv("RM_AUTH_TLS_CLIENT_CA", str(pki / "ca.crt"))
    if tokens:
        monkeypatch.setenv("RM_AUTH_TOKENS", tokens)
    return ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1))


def _score(channel, **kw) -> reward_pb2.ScoreResponse:
    return reward_pb2_grpc.RewardServiceStub(channel).Score(SCORE, timeout=10, **kw)


def test_tls_with_a_bearer_token(home, tiny_rm_dir, pki, monkeypatch):
    srv = _tls_server(monkeypatch, tiny_rm_dir, pki, mutual=False, tokens=f"scorer:{TOKENS['scorer']}")
    try:
        ca = (pki / "ca.crt").read_bytes()
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=ca), grpc.access_token_call_credentials(TOKENS["scorer"])
        )
        with grpc.secure_channel(srv.address, creds) as ch:
            assert len(_score(ch).results) == 1
        with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
            assert _code(lambda: _score(ch)) == UNAUTH
        with grpc.insecure_channel(srv.address) as ch:  # plaintext to a TLS port: no connection
            assert _code(lambda: _score(ch, metadata=_metadata("scorer"))) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_mutual_tls_requires_a_client_certificate(home, tiny_rm_dir, pki, monkeypatch):
    srv = _tls_server(monkeypatch, tiny_rm_dir, pki, mutual=True)
    try:
        ca = (pki / "ca.crt").read_bytes()
        with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
            assert _code(lambda: _score(ch)) == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.crt").read_bytes(),
        )
        with grpc.secure_channel(srv.address, creds) as ch:
            assert len(_score(ch).results) == 1
    finally:
        srv.stop()


def test_tls_settings_must_come_in_pairs(pki):
    from rm_service.server.auth import server_credentials

    with pytest.raises(FailedPrecondition, match="RM_AUTH_TLS_KEY"):
        server_credentials(SecuritySettings(tls_cert=pki / "server.crt"))
    with pytest.raises(FailedPrecondition, match="RM_AUTH_TLS_CLIENT_CA"):
        server_credentials(SecuritySettings(tls_client_ca=pki / "ca.crt"))
    with pytest.raises(FailedPrecondition, match="not a PEM file"):
        server_credentials(SecuritySettings(tls_cert=pki / "server.ext", tls_key=pki / "server.key"))


# --- binding -----------------------------------------------------------------------------------


def test_non_loopback_bind_needs_tokens(home, tiny_rm_dir):
    from rm_service.server.app import RewardServer

    with pytest.raises(FailedPrecondition, match="refusing to bind 0.0.0.0") as err:
        RewardServer(ServeSettings(host="0.0.0.0", port=0, model=str(tiny_rm_dir)), security=SecuritySettings())
    assert "RM_AUTH_TOKENS_FILE" in str(err.value) and "--tokens-file" in str(err.value)


def test_non_loopback_bind_with_tokens_serves_and_warns_without_tls(home, tiny_rm_dir, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("RM_AUTH_TOKENS", f"scorer:{TOKENS['scorer']},admin:{TOKENS['admin']}")
    srv = ServerThread(ServeSettings(host="0.0.0.0", port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1))
    try:
        assert any("without TLS" in r.getMessage() for r in caplog.records)
        with grpc.insecure_channel(srv.address) as ch:  # connect on loopback only
            assert len(_score(ch, metadata=_metadata("admin")).results) == 1
            assert _code(lambda: _score(ch)) == UNAUTH
    finally:
        srv.stop()


# --- configuration -----------------------------------------------------------------------------


def test_role_table():
    from rm_service.server.auth import required_role

    assert required_role("/rm.v1.RewardService/Score") == "scorer"
    assert required_role("/rm.v1.PreferenceService/IngestLabels") == "labeler"
    assert required_role("/rm.v1.TrainingService/RequestRetrain") == "admin"
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert required_role("/some.Other/Method") == "admin"


@pytest.mark.parametrize("bad", ["root:" + "x" * 20, "x" * 24, "scorer:short", "scorer:has a space in it!!"])
def test_bad_token_entries_are_refused_without_echoing_them(bad):
    from rm_service.server.auth import Tokens

    with pytest.raises(FailedPrecondition, match="RM_AUTH_TOKENS entry 2") as err:
        Tokens.from_settings(SecuritySettings(tokens=f"admin:{TOKENS['admin']},{bad}"))
    secret = bad.partition(":")[2] or bad
    assert secret not in str(err.value) and TOKENS["admin"] not in str(err.value)


def test_tokens_from_file_and_env_add_up(tmp_path):
    from rm_service.server.auth import Tokens

    tokens = Tokens.from_settings(SecuritySettings(tokens_file=_tokens_file(tmp_path), tokens="scorer:" + "e" * 20))
    assert len(tokens) == 4 and tokens.role_of(TOKENS["labeler"]) == "labeler" and tokens.role_of("e" * 20) == "scorer"
    assert tokens.role_of("nope") is None and TOKENS["admin"] not in repr(tokens)
    with pytest.raises(FailedPrecondition, match="two roles"):
        Tokens.from_settings(SecuritySettings(tokens=f"scorer:{'t' * 20},admin:{'t' * 20}"))


def test_serve_flags_map_to_settings(tmp_path):
    from rm_service.cli import build_parser, serve_settings

    args = build_parser().parse_args(
        [
            "serve",
            "--tokens-file",
            "/run/tokens",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
            "--metrics-port",
            "0",
            "--log-format",
            "json",
        ]
    )
    serve, security = serve_settings(args)
    assert security.tokens_file == Path("/run/tokens") and security.tls_cert == Path("c.pem")
    assert security.tls_key == Path("k.pem") and security.tls_client_ca == Path("ca.pem")
    assert serve.metrics_port == 0 and serve.log_format == "json"


def test_the_judge_reaches_a_tls_server_with_its_token(home, tiny_rm_dir, pki, monkeypatch):
    """The judge's StoreClient goes through the one channel builder: TLS verified against
    RM_JUDGE_SERVER_TLS_CA and the labeler token on every call (it sent neither before)."""
    from rm_service.errors import Unauthenticated
    from rm_service.judge.store_client import StoreClient

    monkeypatch.setenv("RM_AUTH_TLS_CERT", str(pki / "server.crt"))
    monkeypatch.setenv("RM_AUTH_TLS_KEY", str(pki / "server.key"))
    monkeypatch.setenv("RM_AUTH_TOKENS", f"labeler:{TOKENS['labeler']}")
    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), metrics_port=-1))
    try:
        client = StoreClient(srv.address, TOKENS["labeler"], 10.0, pki / "ca.crt")
        try:
            assert client.stats().labels_total == 0
        finally:
            client.close()
        anonymous = StoreClient(srv.address, None, 10.0, pki / "ca.crt")
        try:
            with pytest.raises(Unauthenticated, match="GetStats"):
                anonymous.stats()
        finally:
            anonymous.close()
    finally:
        srv.stop()
