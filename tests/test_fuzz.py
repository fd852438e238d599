"""Random requests (hypothesis) and raw bytes never crash the server or answer UNKNOWN."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
roles = st.sampled_from(["user", "assistant", "system", "", "robot", "USER"])
texts = st.text(min_size=0, max_size=200)
messages = st.builds(common_pb2.Message, role=roles, content=texts)
items = st.builds(reward_pb2.ScoreItem, id=st.text(max_size=8), prompt=st.lists(messages, max_size=4), completion=texts)
requests = st.builds(
    reward_pb2.ScoreRequest, items=st.lists(items, max_size=5), model_version=st.sampled_from(["", "", "v9", "tiny"])
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_rm_dir):
    from conftest import ServerThread

    from rm_service.settings import ServeSettings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RM_HOME", str(tmp_path_factory.mktemp("fuzz-home")))
        srv = ServerThread(
            ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, max_items_per_request=4, metrics_port=-1)
        )
        channel = grpc.insecure_channel(srv.address)
        yield srv, channel
        channel.close()
        srv.stop()


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_random_score_requests_get_a_defined_status(fuzz_server, request):
    _, channel = fuzz_server
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    assert _code(lambda: stub.Score(request, timeout=30)) in ALLOWED


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=512))
def test_raw_bytes_to_score_never_answer_unknown(fuzz_server, payload):
    _, channel = fuzz_server
    raw = channel.unary_unary("/rm.v1.RewardService/Score", request_serializer=None, response_deserializer=None)
    code = _code(lambda: raw(payload, timeout=30))
    assert code in ALLOWED  # bytes that are not a ScoreRequest: INVALID_ARGUMENT


def test_the_server_is_still_serving_after_the_fuzzing(fuzz_server):
    _, channel = fuzz_server
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ok = reward_pb2_grpc.RewardServiceStub(channel).Score(
        reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=[common_pb2.Message(role="user", content="hi")], completion="hello")]
        ),
        timeout=30,
    )
    assert len(ok.results) == 1
