"""PPO maths against values computed by hand (the arithmetic is written beside each expectation)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.ppo.control import AdaptiveKLController, FixedKLController, build_kl_controller
from pipeline.ppo.losses import (
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    grpo_advantages,
    kl_per_token,
    logprobs_from_logits,
    mask_after_eos,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    sequence_advantages_to_tokens,
    shape_rewards,
    truncated_is_weights,
)


def close(actual, expected, tol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), atol=tol)


def test_masked_mean_and_var_ignore_masked_entries():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert close(masked_mean(x, mask), 4.0)  # (2 + 4 + 6) / 3
    assert close(masked_var(x, mask), 4.0)  # ((2-4)^2 + 0 + (6-4)^2) / (3 - 1)
    assert close(masked_var(x, mask, unbiased=False), 8.0 / 3)  # 8 / 3


def test_whiten_uses_masked_statistics():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 4, unbiased std 2: (2-4)/2 = -1, 0, (6-4)/2 = 1; the masked entry becomes 0.
    assert close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False adds the mean back: -1 + 4, 0 + 4, 1 + 4.
    assert close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])


def test_gae_by_hand():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.3, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.2], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 2 ended at t=1: its t=2 reward and value are ignored
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    # row 1: t=2: delta = 1 + 0.9*0 - 0.2 = 0.8,                 A2 = 0.8
    #        t=1: delta = 0 + 0.9*0.2 - 0.4 = -0.22,             A1 = -0.22 + 0.45*0.8 = 0.14
    #        t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14,             A0 = -0.14 + 0.45*0.14 = -0.077
    # row 2: t=1: delta = 2.0 + 0.9*0 - 0.5 = 1.5,               A1 = 1.5
    #        t=0: delta = 0.3 + 0.9*0.5 - 1.0 = -0.25,           A0 = -0.25 + 0.45*1.5 = 0.425
    assert close(advantages, [[-0.077, 0.14, 0.8], [0.425, 1.5, 0.0]])
    # returns = A + V: -0.077 + 0.5, 0.14 + 0.4, 0.8 + 0.2; 0.425 + 1.0, 1.5 + 0.5, masked 0
    assert close(returns, [[0.423, 0.54, 1.0], [1.425, 2.0, 0.0]])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert close(returns, [[6.0, 5.0, 3.0]])  # 1+2+3, 2+3, 3
    assert close(advantages, [[5.5, 4.5, 2.5]])


def test_clipped_policy_loss_by_hand():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 9.0]])
    old = torch.zeros_like(ratio)
    advantages = torch.tensor([[1.0, 1.0, -2.0, -2.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is masked out
    loss, clip_fraction, approx_kl = clipped_policy_loss(ratio.log(), old, advantages, mask, eps)
    # token 1: max(-1*1.5, -1*1.2) = -1.2 (clipped)   token 2: max(-1*0.5, -1*0.8) = -0.5
    # token 3: max(2*1.5, 2*1.2) = 3.0                token 4: max(2*0.5, 2*0.8) = 1.6 (clipped)
    assert close(loss, (-1.2 - 0.5 + 3.0 + 1.6) / 4)  # 0.725
    assert close(clip_fraction, 0.5)  # tokens 1 and 4
    # k3: ratio 1.5 -> 0.5 - ln 1.5 = 0.0945349; ratio 0.5 -> -0.5 - ln 0.5 = 0.1931472
    assert close(approx_kl, (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4)


def test_clipped_policy_loss_gradient_vanishes_when_clipped():
    logprobs = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _, _ = clipped_policy_loss(logprobs, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert logprobs.grad.item() == 0.0  # ratio 1.5 > 1.2 with A > 0: no incentive to push further


def test_truncated_is_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-1.0, -1.5, -2.0]])
    # exp(0) = 1; exp(-0.5) = 0.60653; exp(1.5) = 4.4817 -> capped at 2
    assert close(truncated_is_weights(old, engine, 2.0), [[1.0, math.exp(-0.5), 2.0]])


def test_clipped_policy_loss_with_weights_by_hand():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    advantages = torch.tensor([[1.0, 1.0, -2.0, -2.0]])
    weights = torch.tensor([[2.0, 0.5, 1.0, 0.0]])
    logprobs = ratio.log().requires_grad_(True)
    loss, clip_fraction, approx_kl = clipped_policy_loss(
        logprobs, torch.zeros_like(ratio), advantages, torch.ones(1, 4), eps, weights
    )
    # per token (as in the unweighted test): -1.2, -0.5, 3.0, 1.6; weighted: -2.4, -0.25, 3.0, 0.0
    assert close(loss, (-2.4 - 0.25 + 3.0 + 0.0) / 4)  # 0.0875
    assert close(clip_fraction, 0.5)  # the weights do not change which term was chosen,
    assert close(approx_kl, (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4)  # nor the KL
    loss.backward()
    # d/dlogp of w * (-A * ratio) = -w * A * ratio on unclipped tokens: token 2: -0.5 * 1 * 0.5 / 4; token 3:
    # -1 * -2 * 1.5 / 4; clipped tokens 1 and 4 get 0
    assert close(logprobs.grad, [[0.0, -0.0625, 0.75, 0.0]])


def test_clipped_policy_loss_with_unit_weights_is_unweighted():
    torch.manual_seed(0)
    logprobs, old, advantages = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5)
    plain = clipped_policy_loss(logprobs, old, advantages, mask, 0.2)
    weighted = clipped_policy_loss(logprobs, old, advantages, mask, 0.2, torch.ones(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(plain, weighted, strict=True))


def test_clipped_policy_loss_at_the_sequence_level_by_hand():
    eps = 0.2
    # response 1: token log-ratios 0.1, 0.2 (A = 1); response 2: -0.3 and a masked token (A = -1); response 3:
    # 0.05, 0.05 (A = 2); the masked token's log-ratio 5.0 must not count
    log_ratio = torch.tensor([[0.1, 0.2], [-0.3, 5.0], [0.05, 0.05]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    logprobs = log_ratio.clone().requires_grad_(True)
    seq = dict(level="sequence")
    loss, clip_fraction, approx_kl = clipped_policy_loss(logprobs, torch.zeros(3, 2), advantages, mask, eps, **seq)
    # ratios e^0.3 = 1.34986 (clipped to 1.2: max(-1.34986, -1.2) = -1.2), e^-0.3 = 0.740818 (A < 0:
    # max(0.740818, 0.8) = 0.8, clipped), e^0.1 = 1.105171 (inside: max(-2.210342, -2.4) = -2.210342)
    assert close(loss, (-1.2 + 0.8 - 2 * math.exp(0.1)) / 3)  # -0.870114
    assert close(clip_fraction, 2 / 3)
    # per-token k3 over the 5 real tokens: e^x - 1 - x for x = 0.1, 0.2, -0.3, 0.05, 0.05
    k3 = [math.exp(x) - 1 - x for x in (0.1, 0.2, -0.3, 0.05, 0.05)]
    assert close(approx_kl, sum(k3) / 5)
    loss.backward()
    # only response 3 is unclipped: d/dlogp_t of -A * exp(sum of its log-ratios) / 3 = -2 * e^0.1 / 3 on each token
    g = -2 * math.exp(0.1) / 3
    assert close(logprobs.grad, [[0.0, 0.0], [0.0, 0.0], [g, g]])
    # the advantage may come on every real token of its response, as the rollout stores it
    per_token = sequence_advantages_to_tokens(advantages, mask)
    assert torch.equal(
        clipped_policy_loss(log_ratio, torch.zeros(3, 2), per_token, mask, eps, **seq)[0], loss.detach()
    )
    # one weight per response: response 3's term doubled
    weighted = clipped_policy_loss(
        log_ratio, torch.zeros(3, 2), advantages, mask, eps, torch.tensor([1.0, 1.0, 2.0]), **seq
    )
    assert close(weighted[0], (-1.2 + 0.8 - 4 * math.exp(0.1)) / 3)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[1.5, 1.5, 1.1]])
    returns = torch.tensor([[2.0, 1.0, 3.0]])
    loss, clip_fraction = clipped_value_loss(values, old, returns, torch.ones(1, 3), 0.2)
    # V_clip = 1.2, 1.2, 1.1
    # token 1: max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64 (clipped)
    # token 2: max((1.5-1)^2, (1.2-1)^2) = max(0.25, 0.04) = 0.25
    # token 3: max((1.1-3)^2, (1.1-3)^2) = 3.61
    assert close(loss, 0.5 * (0.64 + 0.25 + 3.61) / 3)  # 0.75
    assert close(clip_fraction, 1 / 3)


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -1.0])
    ref = torch.tensor([-2.0, -1.0, -1.0])
    assert close(kl_per_token(logp, ref, "k1"), [1.0, -1.0, 0.0])  # log p - log q
    # k3 = (q/p - 1) - log(q/p): q/p = e^-1 -> e^-1 - 1 + 1 = 0.3678794; q/p = e -> e - 1 - 1 = 0.7182818
    assert close(kl_per_token(logp, ref, "k3"), [math.exp(-1), math.e - 2, 0.0])
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logp, ref, "k2")


def test_entropy_and_logprobs_from_logits_by_hand():
    # uniform over 4: ln 4; probs (1/4, 3/4): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351
    assert close(entropy_from_logits(torch.zeros(1, 4)), [math.log(4)])
    assert close(
        entropy_from_logits(torch.tensor([[0.0, math.log(3.0)]])), [0.25 * math.log(4) + 0.75 * math.log(4 / 3)]
    )
    # temperature 2 halves the logits: softmax(0, ln 3 / 2) = (1, sqrt 3) / (1 + sqrt 3) at token 1
    lp = logprobs_from_logits(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1]), temperature=2.0)
    assert close(lp, [math.log(math.sqrt(3) / (1 + math.sqrt(3)))])


def test_mask_after_eos_and_missing_eos_penalty_by_hand():
    ids = torch.tensor([[4, 2, 7], [4, 5, 6]])  # EOS = 2
    mask, ended = mask_after_eos(ids, eos_id=2)
    assert torch.equal(mask, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    scores = torch.tensor([1.0, 2.0])
    # the second response never ended: 2.0 - 1.5 = 0.5; the first keeps 1.0
    assert close(apply_missing_eos_penalty(scores, ended, 1.5), [1.0, 0.5])


def test_shape_rewards_puts_score_on_last_real_token():
    scores = torch.tensor([2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, non_score = shape_rewards(scores, kl, 0.1, mask)
    # -0.1 * kl on real tokens; row 1 ends at t=1: -0.02 + 2 = 1.98; row 2 at t=2: -0.05 + 3 = 2.95
    assert close(non_score, [[-0.01, -0.02, 0.0], [-0.05, -0.05, -0.05]])
    assert close(rewards, [[-0.01, 1.98, 0.0], [-0.05, -0.05, 2.95]])


def test_explained_variance_by_hand():
    target = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert close(explained_variance(target, target, mask), 1.0)
    # residual (-1, 0, 1) has the variance of the target (1): 1 - 1/1 = 0
    assert close(explained_variance(torch.full((1, 3), 2.0), target, mask), 0.0)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    ctl.update(9.0, n_episodes=10)  # e = clip(9/6 - 1, -0.2, 0.2) = 0.2: 0.1 * (1 + 0.2 * 10/100) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, n_episodes=50)  # e = 5.4/6 - 1 = -0.1: 0.102 * (1 - 0.1 * 50/100) = 0.0969
    assert ctl.value == pytest.approx(0.0969)
    restored = AdaptiveKLController(0.5, 6.0, 100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = build_kl_controller(0.05, None, 100)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    assert isinstance(build_kl_controller(0.05, 6.0, 100), AdaptiveKLController)


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others_by_hand():
    # group 1: rewards 1, 2, 3, 6 -> others' means 11/3, 10/3, 9/3, 6/3 -> advantages -8/3, -4/3, 0, 4
    # group 2: rewards 0, 0, 0, 0 -> all 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0])
    assert close(rloo_advantages(rewards, 4), [-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    # k = 2: each response's baseline is the other one: [5, 1] -> [4, -4]
    assert close(rloo_advantages(torch.tensor([5.0, 1.0]), 2), [4.0, -4.0])
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_grpo_advantage_is_the_score_normalised_within_its_group_by_hand():
    # scores 1, 2, 3, 6: mean 3, deviations -2, -1, 0, 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
    std = math.sqrt(14 / 3)
    expected = [-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4)]
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    assert close(grpo_advantages(scores, 4), expected + [0.0] * 4)  # an all-equal group teaches nothing
    assert close(grpo_advantages(torch.tensor([1.0, 3.0]), 2), [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])


def test_a_responses_advantage_lands_on_each_of_its_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert close(sequence_advantages_to_tokens(torch.tensor([2.0, -1.0]), mask), [[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]])
