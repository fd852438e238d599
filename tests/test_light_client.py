"""The light client (clients/python, package rm_client) against a real server on port 0: it
imports and scores with only grpcio and protobuf, its asyncio client agrees with the blocking
one, and its TRL and verl reward functions take the shapes those trainers pass."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
import tomllib

import pytest
from conftest import CLIENT, ServerThread

from rm_client import AsyncRewardClient, InvalidRequest, RewardClient
from rm_client.trl import AsyncRewardFunction, RewardFunction
from rm_client.verl import ComputeScore, async_compute_score
from rm_service.settings import ServeSettings

QUESTION = "Tell me about rivers."
ANSWERS = ["The Nile is the longest.", "Rivers are wet.", "I do not know."]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_rm_dir):
    """One model-only server for the module (the adapters only score)."""
    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def expected(client) -> list[float]:
    """The rewards of ANSWERS to QUESTION, asked through the plain client."""
    return client.score([[{"role": "user", "content": QUESTION}]] * len(ANSWERS), ANSWERS).rewards


def test_the_distribution_needs_only_grpcio_and_protobuf():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    names = sorted(dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"])
    assert names == ["grpcio", "protobuf"]


# Run in a fresh interpreter whose imports of torch, numpy, transformers and the server's
# packages fail: what a trainer's process without them sees.
ISOLATED = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "numpy", "transformers", "rm_service", "policy_trainer"}:
            raise ImportError(f"{name} is not available to the light client")

sys.meta_path.insert(0, Refuse())
from rm_client import RewardClient
from rm_client.trl import RewardFunction
from rm_client.verl import ComputeScore

address, question, answers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reward = RewardFunction(addresses=address)
compute = ComputeScore(addresses=address, as_float=True)
print(json.dumps({"trl": reward(prompts=[question] * len(answers), completions=answers),
                  "verl": compute.batch(None, answers, None, [{"prompt": question}] * len(answers))}))
"""


def test_imports_and_scores_with_only_grpcio_and_protobuf(server, expected, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED, server.address, QUESTION, json.dumps(ANSWERS)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(CLIENT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)
    assert got["trl"] == pytest.approx(expected, abs=1e-6)
    assert got["verl"] == pytest.approx(expected, abs=1e-6)


def test_asyncio_client_agrees_with_the_blocking_one(server, expected):
    async def run():
        async with AsyncRewardClient([server.address], chunk_items=1) as c:
            return await c.score([[{"role": "user", "content": QUESTION}]] * len(ANSWERS), ANSWERS)

    scores = asyncio.run(run())
    assert scores.rewards == pytest.approx(expected, abs=1e-6)
    assert len(scores.members) == len(ANSWERS) and scores.version


def test_server_refusals_are_typed_and_name_the_field(client):
    with pytest.raises(InvalidRequest, match=r"prompt\[0\]\.role"):
        client.score([[{"role": "wizard", "content": QUESTION}]], ["Hello."])
    with pytest.raises(ValueError, match="one prompt per completion"):
        client.score([[{"role": "user", "content": QUESTION}]], ["a", "b"])


def test_trl_standard_and_conversational_formats_score_alike(client, expected):
    reward = RewardFunction(client)
    metrics = {}
    standard = reward(
        prompts=[QUESTION] * 3,
        completions=ANSWERS,
        completion_ids=[[1]] * 3,
        trainer_state=None,
        log_metric=metrics.__setitem__,
        log_extra=lambda *a: None,
        answer=["x"] * 3,
    )
    conversational = reward(
        prompts=[[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]] * 3,
        completions=[[{"role": "assistant", "content": a}] for a in ANSWERS],
    )
    assert all(isinstance(r, float) for r in standard) and len(standard) == 3
    assert standard == pytest.approx(expected, abs=1e-6)
    assert conversational == pytest.approx(expected, abs=1e-6)
    assert metrics["rm_service/uncertainty"] == 0.0  # a single head
    assert reward.__name__ == "rm_service"


def test_trl_reward_function_refuses_what_it_cannot_score(client):
    reward = RewardFunction(client)
    with pytest.raises(ValueError, match=r"completions\[0\]\[0\]\.role"):
        reward(prompts=[[{"role": "user", "content": QUESTION}]], completions=[[{"role": "user", "content": "Hi"}]])
    with pytest.raises(ValueError, match=r"^prompts\[0\]\[0\]\.content\[0\]: only text content parts"):
        reward(prompts=[[{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]], completions=["Hi"])
    with pytest.raises(ValueError, match=r"^completions\[1\]\[0\]\.tool_calls\[0\]: a tool call needs a function name"):
        reward(prompts=[QUESTION] * 2, completions=["Hi", [{"role": "assistant", "content": None, "tool_calls": [{}]}]])
    with pytest.raises(ValueError, match=r"^completions\[0\]: expected a string or a non-empty list"):
        reward(prompts=[QUESTION], completions=[[]])
    with pytest.raises(ValueError, match="either a RewardClient"):
        RewardFunction()


WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
TOOL_TURNS = [  # what GRPOTrainer(tools=[weather]) hands a reward function: a tool-call turn has content=None
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "name": "weather", "content": "18 C, sunny"},
]
FOLDED = [  # the same turns as Qwen2.5's chat template renders them, in the roles rm.v1 knows
    {
        "role": "assistant",
        "content": '\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    },
    {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"},
]
REPLY = "It is 18 C and sunny in Paris."


def test_trl_tool_calling_completions_score_their_last_reply_after_the_folded_tool_turns(client):
    reward = RewardFunction(client)
    got = reward(
        prompts=[WEATHER, WEATHER, WEATHER],
        completions=[
            [*TOOL_TURNS, {"role": "assistant", "content": REPLY}],
            [{"role": "assistant", "content": REPLY}],
            TOOL_TURNS[:1],  # ended in a tool call: the call is what is scored
        ],
    )
    expected = client.score([WEATHER + FOLDED, WEATHER, WEATHER], [REPLY, REPLY, FOLDED[0]["content"]]).rewards
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[0] != pytest.approx(got[1], abs=1e-6)  # the tool turns reach the reward model
    # Tool turns already in the prompt (a multi-turn dataset) fold the same way.
    assert reward(prompts=[WEATHER + TOOL_TURNS], completions=[REPLY]) == pytest.approx(expected[:1], abs=1e-6)


def test_trl_async_reward_function_is_awaited_as_trl_awaits_it(server, expected):
    from trl.trainer.utils import is_async_callable

    reward = AsyncRewardFunction(addresses=server.address, chunk_items=1)
    assert is_async_callable(reward) and reward.__name__ == "rm_service"

    async def run():  # TRL gathers async reward functions on its own event loop
        return await asyncio.gather(
            reward(prompts=[QUESTION] * 3, completions=ANSWERS),
            reward(
                prompts=[[{"role": "user", "content": QUESTION}]],
                completions=[[{"role": "assistant", "content": ANSWERS[0]}]],
            ),
        )

    both, one = asyncio.run(run())
    assert both == pytest.approx(expected, abs=1e-6) and one == pytest.approx(expected[:1], abs=1e-6)
    copy = pickle.loads(pickle.dumps(reward))
    assert asyncio.run(copy(prompts=[QUESTION], completions=ANSWERS[:1])) == pytest.approx(expected[:1], abs=1e-6)


def test_trl_reward_function_built_from_addresses_pickles_to_workers(server, expected):
    reward = RewardFunction(addresses=[server.address], score="raw_score", name="rm")
    raw = reward(prompts=[QUESTION] * 3, completions=ANSWERS)
    copy = pickle.loads(pickle.dumps(reward))
    try:
        assert copy(prompts=[QUESTION] * 3, completions=ANSWERS) == pytest.approx(raw, abs=1e-6)
    finally:
        reward.close()
        copy.close()


def test_verl_compute_score_single_batch_and_async(server, client, expected):
    compute = ComputeScore(client)
    one = compute("hh", ANSWERS[0], None, extra_info={"prompt": [{"role": "user", "content": QUESTION}], "index": 0})
    assert set(one) == {"score", "raw_score", "uncertainty"}
    assert one["score"] == pytest.approx(expected[0], abs=1e-6)
    batch = compute.batch(
        data_sources=["hh"] * 3, solution_strs=ANSWERS, ground_truths=[None] * 3, extra_infos=[{"prompt": QUESTION}] * 3
    )
    assert [b["score"] for b in batch] == pytest.approx(expected, abs=1e-6)

    score_async = async_compute_score(addresses=server.address, as_float=True)

    async def run():
        return await asyncio.gather(
            *(
                score_async(data_source="hh", solution_str=a, ground_truth=None, extra_info={"prompt": QUESTION})
                for a in ANSWERS
            )
        )

    assert asyncio.run(run()) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"extra_info\[0\] has no 'prompt'"):
        compute("hh", ANSWERS[0], None, extra_info={"index": 0})


@pytest.mark.slow
def test_trl_grpo_trainer_runs_two_steps_on_served_rewards(server, tiny_lm_dir, tmp_path):
    """TRL's own GRPOTrainer, a tiny policy on CPU, rewards from the server through RewardFunction."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    calls = []
    reward = RewardFunction(addresses=server.address)

    def counted(prompts, completions, **kwargs):
        calls.append(len(completions))
        return reward(prompts, completions, **kwargs)

    counted.__name__ = "rm_service"
    dataset = datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"{QUESTION} ({i})"}] for i in range(8)]}
    )
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    async_reward = AsyncRewardFunction(addresses=server.address, name="rm_service_async")
    trainer = trl.GRPOTrainer(
        model=str(tiny_lm_dir), reward_funcs=[counted, async_reward], train_dataset=dataset, args=args
    )
    try:
        trainer.train()
    finally:
        reward.close()
    assert trainer.state.global_step == 2
    assert calls and all(n == 4 for n in calls)
    logged = [h for h in trainer.state.log_history if "rewards/rm_service/mean" in h]
    assert logged and all(isinstance(h["rewards/rm_service/mean"], float) for h in logged)
    # TRL ran the async function on its own loop, on the same completions: the same mean reward.
    assert all(
        h["rewards/rm_service_async/mean"] == pytest.approx(h["rewards/rm_service/mean"], abs=1e-5) for h in logged
    )
