"""The PPO math on hand-worked tensors: GAE, the clipped objective, value clipping, where the
KL penalty and the reward land, whitening with padding, RLOO, the KL controller, masks."""

from __future__ import annotations

import math

import pytest
import torch

from policy_trainer.ppo import (
    AdaptiveKLController,
    RunningMoments,
    entropy_of,
    gae,
    logprobs_of,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    rloo_advantages,
    shape_scores,
    value_loss,
)
from policy_trainer.rollout import left_pad, response_mask


def test_gae_matches_a_hand_worked_example():
    # Row 0: two real tokens then padding (whose reward 5 and value 9 must be ignored).
    # gamma 0.9, lambda 0.8:
    #   t=1: delta = 1.0 + 0.9 * 0 - 0.2 = 0.8                    A1 = 0.8
    #   t=0: delta = 0.1 + 0.9 * 0.2 - 0.5 = -0.22                A0 = -0.22 + 0.72 * 0.8 = 0.356
    # Row 1: reward 1 at the last of three tokens, values 0:  A = [0.72^2, 0.72, 1]
    rewards = torch.tensor([[0.1, 1.0, 5.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, gae_lambda=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[0.356, 0.8, 0.0], [0.5184, 0.72, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.856, 1.0, 0.0], [0.5184, 0.72, 1.0]]))


def test_gae_with_lambda_one_and_no_discount_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.5, -1.0, 2.0, 3.0]])
    values = torch.tensor([[0.3, 0.1, -0.2, 0.7]])
    mask = torch.ones(1, 4)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    to_go = torch.tensor([[4.5, 4.0, 5.0, 3.0]])
    torch.testing.assert_close(returns, to_go)
    torch.testing.assert_close(advantages, to_go - values)


def test_clipped_objective_on_fixed_tensors():
    # ratio  A     -A*ratio  -A*clip(ratio)  max (pessimistic)
    # 1.5    +1    -1.5      -1.2            -1.2  (clipped: no gain beyond 1.2)
    # 0.5    +1    -0.5      -0.8            -0.5  (unclipped: the loss of a worse action is kept)
    # 1.1    -1    +1.1      +1.1            +1.1
    # 0.5    -1    +0.5      +0.8            +0.8  (clipped)
    # 3.0    +10   padding: ignored
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]])
    old_logprobs = torch.full_like(ratio, -2.0)
    logprobs = (old_logprobs + ratio.log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 10.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef=0.2)
    assert out.pg_loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert out.clipfrac.item() == pytest.approx(3 / 4)  # |ratio - 1| > 0.2 on real tokens
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.5)) / 4
    assert out.approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)
    out.pg_loss.backward()
    grad = logprobs.grad[0]
    assert grad[0] == 0 and grad[3] == 0 and grad[4] == 0  # clipped tokens and padding pass no gradient
    assert grad[1].item() == pytest.approx(-1.0 * 0.5 / 4)  # d(-A * ratio)/dlogp = -A * ratio, over 4 tokens
    assert grad[2].item() == pytest.approx(1.0 * 1.1 / 4)


def test_value_clipping_on_fixed_tensors():
    # t0: unclipped (0.5-1)^2 = 0.25, clipped to 0.2: (0.2-1)^2 = 0.64 -> 0.64
    # t1: inside the clip range: (-0.1-1)^2 = 1.21 both ways         -> 1.21
    # t2: unclipped (1-(-1))^2 = 4, clipped (0.2-(-1))^2 = 1.44        -> 4
    values = torch.tensor([[0.5, -0.1, 1.0, 7.0]])
    old_values = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    vf_loss, vf_clipfrac = value_loss(values, old_values, returns, mask, clip_vf=0.2)
    assert vf_loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 4.0) / 3)
    assert vf_clipfrac.item() == pytest.approx(1 / 3)
    unclipped, _ = value_loss(values, old_values, returns, mask, clip_vf=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 1.21 + 4.0) / 3)


def test_kl_penalty_on_every_token_and_the_score_only_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    scores = torch.tensor([10.0, -4.0])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    expected = torch.tensor(
        [
            [-0.05, 0.1, 0.0 + 10.0, 0.0],  # last real token of row 0 is t=2; t=3 is padding
            [-0.1, -0.1, -0.1, -0.1 - 4.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    white = masked_whiten(x, mask)
    noisy = masked_whiten(torch.where(mask.bool(), x, torch.tensor(1e6)), mask)  # padding holds garbage
    torch.testing.assert_close(white, noisy)
    real = white[mask.bool()]
    reference = (x[mask.bool()] - x[mask.bool()].mean()) / x[mask.bool()].std()
    torch.testing.assert_close(real, reference, rtol=1e-4, atol=1e-4)
    assert torch.all(white[~mask.bool()] == 0)


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # one prompt, 4 samples with returns 1, 2, 3, 6 (score at the end, no KL)
    rewards = torch.zeros(4, 3)
    rewards[:, -1] = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mask = torch.ones(4, 3)
    mask[0, 2] = 0  # a shorter response: its advantage covers its real tokens only
    rewards[0, 1], rewards[0, 2] = 1.0, 0.0
    advantages = rloo_advantages(rewards, mask, group_size=4)
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0])
    torch.testing.assert_close(advantages[:, 0], expected)
    assert advantages[0, 2] == 0
    torch.testing.assert_close(advantages[1:, 2], expected[1:])


def test_logprobs_and_entropy_match_torch_distributions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logprobs_of(logits, tokens), dist.log_prob(tokens))
    torch.testing.assert_close(entropy_of(logits), dist.entropy())


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_sequences=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(current_kl=5.4, n_sequences=100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.002 * (1 - 0.1 * 0.01))
    fixed = AdaptiveKLController(0.1, target=None, horizon=10000)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1


def test_running_moments_equal_the_statistics_of_everything_seen_and_reset():
    torch.manual_seed(0)
    chunks = [torch.randn(n) * 3 + 2 for n in (5, 1, 17)]
    moments = RunningMoments()
    for c in chunks:
        moments.update(c)
    everything = torch.cat(chunks).double()
    assert moments.mean == pytest.approx(float(everything.mean()))
    assert moments.std == pytest.approx(float(everything.std()))
    moments.reset()
    assert (moments.count, moments.mean, moments.std) == (0, 0.0, 1.0)


def test_score_shaping_normalises_clips_and_penalises_missing_eos():
    served = torch.tensor([1.0, 3.0, 100.0])
    ended = torch.tensor([True, False, True])
    plain = shape_scores(served, ended, None, reward_clip=10.0, missing_eos_penalty=0.5)
    torch.testing.assert_close(plain, torch.tensor([1.0, 2.5, 10.0]))
    moments = RunningMoments()
    normalised = shape_scores(served, ended, moments, reward_clip=None, missing_eos_penalty=0.0)
    torch.testing.assert_close(normalised, ((served - served.mean()) / served.std()).float())


def test_response_mask_ends_at_the_first_eos_and_left_padding_aligns_prompts():
    responses = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    mask, ended = response_mask(responses, stop_ids=[2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    ids, attn = left_pad([[7, 8, 9], [4]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
