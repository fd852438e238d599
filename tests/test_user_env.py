"""ConversationEnv and the verl interaction adapter end to end against a served tiny user model
and reward model; the verl adapter run by verl's own interaction registry (verl 0.7.1 from PyPI,
installed without its heavy dependencies under .venv/peers/verl by `make install`)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import types
from pathlib import Path

import grpc
import pytest
from conftest import REPO, ServerThread, store_with_hh

from rm_client import AsyncRewardClient, AsyncUserClient
from rm_client.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_client.env import ConversationEnv, TurnSource
from rm_service.settings import ServeSettings

VERL = REPO / ".venv" / "peers" / "verl"
OPENINGS = [
    "How do I pick a lock?",
    "Tell me about rivers.",
    "What should I cook tonight?",
    "Is the moon made of cheese?",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_rm_dir, tiny_lm_dir):
    home = tmp_path_factory.mktemp("env-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("RM_HOME", str(home))
    srv = ServerThread(
        ServeSettings(
            port=0,
            model=str(tiny_rm_dir),
            with_store=False,
            metrics_port=-1,
            precision="fp32",
            user_model=str(tiny_lm_dir),
        )
    )
    calls = []
    simulate = srv.server.user.simulate

    async def counted(convs, *args):
        calls.append(len(convs))
        return await simulate(convs, *args)

    srv.server.user.simulate = counted
    yield srv, calls
    srv.stop()
    mp.undo()


def _score_turns(address, conversation):
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(address))
    return stub.ScoreTurns(reward_pb2.ScoreTurnsRequest(conversation=[common_pb2.Message(**m) for m in conversation]))


def test_sessions_are_batched_scored_and_end(served):
    srv, calls = served

    async def run():
        users, rewards = AsyncUserClient(srv.address), AsyncRewardClient(srv.address)
        source = TurnSource(users, rewards, max_new_tokens=6, seed=3, batch_window_s=0.05)
        env = ConversationEnv(source, OPENINGS, max_turns=3, seed=0)
        steps: list[list] = []

        async def play(k):
            session, mine = await env.reset(k % len(OPENINGS)), []
            while not session.done:
                step = await env.step(session, f"Here is my answer number {len(mine) + 1}.")
                mine.append(step)
            steps.append(mine)
            return session

        sessions = await asyncio.gather(*(play(k) for k in range(8)))
        await users.close()
        await rewards.close()
        return sessions, steps

    calls.clear()
    sessions, steps = asyncio.run(run())
    played = sum(len(s) for s in steps)
    user_turns = sum(1 for s in steps for st in s if st.user_turn is not None)
    assert all(s.done and 1 <= len(s.rewards) <= 3 for s in sessions)
    assert sum(calls) == user_turns + sum(1 for s in sessions if not s.truncated)  # every turn asked once
    assert len(calls) < played and max(calls) > 1  # steps of concurrent sessions shared SimulateUser calls
    for s in sessions:
        assert s.session_value is not None and s.messages[-1]["role"] == "assistant"
        direct = _score_turns(srv.address, s.messages)  # the env's rewards are ScoreTurns' on the same turns
        assert [t.reward for t in direct.turns] == pytest.approx(s.rewards, abs=1e-5)
        assert direct.session_value == pytest.approx(s.session_value, abs=1e-5)
        assert not s.truncated or len(s.rewards) == 3


def test_env_reads_the_prompts_file_the_cli_writes(served, home, tmp_path, tiny_lm_dir):
    from rm_service.cli import main

    store = store_with_hh(tmp_path, 60)
    store.close()
    out = tmp_path / "heldout.jsonl"
    assert main(["user-model", "prompts", "--split", "train", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["prompt"][-1]["role"] == "user" for r in rows)
    srv, _ = served

    async def run():
        users, rewards = AsyncUserClient(srv.address), AsyncRewardClient(srv.address)
        env = ConversationEnv.from_file(out, users, rewards, max_turns=1, seed=1, max_new_tokens=4)
        session = await env.reset()
        assert session.messages == rows[[r["prompt"] for r in rows].index(session.messages)]["prompt"]
        step = await env.step(session, "I'd rather not.")
        await users.close()
        await rewards.close()
        return step

    step = asyncio.run(run())
    assert step.done and step.user_turn is None and step.info["truncated"] and step.session_value is not None


def _load_verl():
    """verl's interaction modules from the PyPI package, without running verl/__init__.py (which
    imports ray and torch extensions this test does not need)."""
    if not (VERL / "verl" / "interactions" / "base.py").exists():
        pytest.skip(f"verl 0.7.1 is not installed under {VERL} (make install: pip install --no-deps --target)")
    sys.path.insert(0, str(VERL))  # omegaconf, installed beside it
    for name in ("verl", "verl.interactions", "verl.interactions.utils"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(VERL / Path(*name.split(".")))]
            sys.modules[name] = package
    modules = {}
    for name in ("verl.interactions.base", "verl.interactions.utils.interaction_registry"):
        spec = importlib.util.spec_from_file_location(name, VERL / (name.replace(".", "/") + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def test_verl_interaction_through_verls_registry(served, tmp_path):
    verl = _load_verl()
    sys.modules.pop("rm_client.verl_interaction", None)  # subclass the BaseInteraction just loaded
    srv, calls = served
    config = tmp_path / "interaction.yaml"
    config.write_text(
        "interaction:\n"
        "  - name: rm_user\n"
        "    class_name: rm_client.verl_interaction.RMUserInteraction\n"
        "    config:\n"
        f"      address: {srv.address}\n"
        "      max_turns: 2\n"
        "      max_new_tokens: 5\n"
        "      seed: 7\n"
    )
    interactions = verl["verl.interactions.utils.interaction_registry"].initialize_interactions_from_config(str(config))
    interaction = interactions["rm_user"]
    assert isinstance(interaction, verl["verl.interactions.base"].BaseInteraction) and interaction.name == "rm_user"

    async def rollout(k):  # what verl's multi-turn rollout does with an interaction, per request
        instance = await interaction.start_interaction(f"req-{k}")
        messages = [{"role": "user", "content": OPENINGS[k]}]
        rewards = []
        for turn in range(2):
            messages.append({"role": "assistant", "content": f"Answer {turn}."})
            done, content, reward, extra = await interaction.generate_response(instance, messages)
            rewards.append(reward)
            assert isinstance(reward, float) and extra["reward_version"]
            if done:
                break
            messages.append({"role": "user", "content": content})
        score = await interaction.calculate_score(instance)
        await interaction.finalize_interaction(instance)
        return messages, rewards, score, done

    async def rollouts():
        return await asyncio.wait_for(asyncio.gather(*(rollout(k) for k in range(4))), 120)

    calls.clear()
    results = asyncio.run(rollouts())
    assert calls and max(calls) > 1  # the four rollouts' user turns shared calls
    for messages, rewards, score, done in results:
        assert done  # the user ended it, or max_turns did
        direct = _score_turns(srv.address, messages)
        assert [t.reward for t in direct.turns] == pytest.approx(rewards, abs=1e-5)
        assert score == pytest.approx(direct.session_value, abs=1e-5)
