"""The batch token budget by measurement (server.budget): the choice from a curve, the doubling
that stops where tokens/s stops rising, and a real server that measures its own at start."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from conftest import ServerThread

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.server import budget
from rm_service.settings import ServeSettings


def test_the_smallest_budget_within_tolerance_of_the_best_is_chosen():
    curve = {256: 800.0, 512: 1000.0, 1024: 1030.0, 2048: 900.0}
    assert budget.choose_budget(curve, tolerance=0.05) == 512  # 1000 >= 0.95 x 1030
    assert budget.choose_budget(curve, tolerance=0.0) == 1024
    assert budget.choose_budget({4096: 5.0}) == 4096


@pytest.mark.parametrize(
    "rates, cap, timed",
    [
        ({256: 1.0, 512: 2.0, 1024: 2.05, 2048: 9.0}, 1 << 16, [256, 512, 1024]),  # +2.5%: no gain, stop there
        ({256: 1.0, 512: 2.0, 1024: 1.0}, 1 << 16, [256, 512, 1024]),  # falls: stop
        ({256: 1.0, 512: 2.0, 1024: 4.0, 2048: 8.0}, 1024, [256, 512, 1024]),  # still rising at the cap
    ],
)
def test_the_curve_doubles_while_tokens_per_s_rises(rates, cap, timed):
    asked = []

    async def rate_at(tokens: int) -> float:
        asked.append(tokens)
        return rates[tokens]

    curve = asyncio.run(budget.measure_curve(rate_at, start=256, cap=cap, gain=0.05))
    assert asked == timed and list(curve) == timed and curve == {b: rates[b] for b in timed}


def _score(address: str, n: int) -> list[float]:
    with grpc.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        items = [
            reward_pb2.ScoreItem(prompt=[common_pb2.Message(role="user", content=f"q{i}")], completion="a " * (i + 1))
            for i in range(n)
        ]
        return [r.reward for r in stub.Score(reward_pb2.ScoreRequest(items=items), timeout=60).results]


@pytest.mark.parametrize("setting", [0, 512])
def test_a_server_measures_its_budget_unless_one_is_set(home, tiny_rm_dir, caplog, setting):
    caplog.set_level(logging.INFO, logger="rm_service.server.batcher")
    srv = ServerThread(
        ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1, max_batch_tokens=setting)
    )
    try:
        chosen = srv.server.reward.batcher.max_batch_tokens
        measured = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch budget measured")]
        if setting:
            assert chosen == setting and not measured
        else:
            assert len(measured) == 1 and measured[0].endswith(f"-> {chosen} tokens"), measured
            assert chosen >= budget.START and chosen & (chosen - 1) == 0  # a power of two on the ladder
        assert len(_score(srv.address, 8)) == 8
    finally:
        srv.stop()
