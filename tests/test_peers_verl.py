"""verl 0.9's own reward loop against a real server: verl's loader (`load_reward_manager`) reads
the documented keys (`reward.custom_reward_function.path/name`, `reward.reward_manager.name`),
loads a file that uses rm_client.verl, and verl's naive reward manager scores a rollout through
it, the blocking and the async function alike, to the rewards the plain client gets.

verl 0.9.1 is installed with pip --target into .venv/peers/verl-0.9 (`make peers-verl`; not in
`make install`: it imports ray at the top of verl.protocol, 240 MB of the folder's 283 MB); the
test skips, naming that target, where it is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ServerThread, peer

from rm_client import RewardClient
from rm_service.settings import ServeSettings

peer("verl-0.9", "verl")
# Another verl imported first in this process (an older one from another peers folder) lacks the reward loop: skip.
pytest.importorskip("verl.experimental.reward_loop.reward_manager", reason="verl 0.9's reward loop is not importable")
from omegaconf import OmegaConf  # noqa: E402  (verl's own config library, from the same folder)
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_manager import NaiveRewardManager  # noqa: E402
from verl.trainer.ppo.reward import load_reward_manager  # noqa: E402

QUESTION = [{"role": "user", "content": "Tell me about rivers."}]
ANSWERS = ["The Nile is the longest.", "Rivers are wet."]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_rm_dir):
    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1))
    yield srv
    srv.stop()


def _config(path, name: str, manager: str = "naive"):
    """The keys the docs give, as verl 0.9's trainer config holds them."""
    return OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {"path": str(path), "name": name, "reward_kwargs": {}},
                "reward_manager": {"name": manager, "source": "register"},
            }
        }
    )


def _rollout(tokenizer, answer: str) -> DataProto:
    """One sample as verl's rollout hands it to the reward manager: prompt and response ids, the
    attention mask over both, the row's data_source, reward_model and extra_info columns."""
    prompt = tokenizer("Tell me about rivers.", add_special_tokens=False)["input_ids"]
    response = tokenizer(answer, add_special_tokens=False)["input_ids"]
    pad = 4  # the response padded to its generation length, as verl pads it
    responses = torch.tensor([response + [tokenizer.pad_token_id] * pad])
    mask = torch.tensor([[1] * (len(prompt) + len(response)) + [0] * pad])
    return DataProto.from_dict(
        tensors={"prompts": torch.tensor([prompt]), "responses": responses, "attention_mask": mask},
        non_tensors={
            "data_source": np.array(["hh"], dtype=object),
            "reward_model": np.array([{"ground_truth": None}], dtype=object),
            "extra_info": np.array([{"prompt": QUESTION, "index": 0}], dtype=object),
        },
    )


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_verls_loader_and_naive_manager_score_through_rm_client(server, tiny_tokenizer, tmp_path, name):
    reward_file = tmp_path / "rm_reward.py"
    reward_file.write_text(
        "from rm_client.verl import ComputeScore, async_compute_score\n"
        f"compute_score = ComputeScore(addresses={server.address!r})\n"
        f"compute_score_async = async_compute_score(addresses={server.address!r})\n"
    )
    manager = load_reward_manager(_config(reward_file, name), tiny_tokenizer)
    assert isinstance(manager, NaiveRewardManager)
    results = [manager.loop.run_until_complete(manager.run_single(_rollout(tiny_tokenizer, a))) for a in ANSWERS]
    with RewardClient(server.address) as client:
        expected = client.score([QUESTION] * len(ANSWERS), ANSWERS).rewards
    assert [r["reward_score"] for r in results] == pytest.approx(expected, abs=1e-6)
    assert set(results[0]["reward_extra_info"]) >= {"score", "raw_score", "uncertainty"}  # verl logs these


def test_the_batch_manager_the_old_docs_named_is_gone_in_verl_0_9(tmp_path):
    reward_file = tmp_path / "rm_reward.py"
    reward_file.write_text("def compute_score(**kwargs):\n    return 0.0\n")
    with pytest.raises(ValueError, match="Unknown reward manager: batch"):
        load_reward_manager(_config(reward_file, "compute_score", manager="batch"), None)
