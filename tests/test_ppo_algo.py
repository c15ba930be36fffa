"""PPO math against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rto.forward import entropy_from_logits
from rto.ppo.algo import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_bonus,
    gae_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    sampler_mismatch,
    truncated_is_weights,
)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0
    )


def test_gae_by_hand():
    # Row 0: γ=0.9, λ=0.8 done below by hand; position 3 is padding with garbage reward/value.
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: δ = 2 + 0 − 1.5 = 0.5 (no bootstrap past the last token), A = 0.5
    # t=1: δ = 0 + 0.9·1.5 − 1 = 0.35, A = 0.35 + 0.72·0.5 = 0.71
    # t=0: δ = 1 + 0.9·1 − 0.5 = 1.4,  A = 1.4 + 0.72·0.71 = 1.9112
    close(advantages, [[1.9112, 0.71, 0.5, 0.0]])
    close(returns, [[2.4112, 1.71, 2.0, 0.0]])


def test_gae_with_gamma_lambda_one_is_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[10.0, 9.0, 7.0, 4.0], [2.0, 1.0, 0.0, 0.0]])
    close(advantages, [[9.5, 10.0, 5.0, 4.0], [2.0, 1.0, 0.0, 0.0]])


def test_masked_statistics_and_whitening_against_direct_formula():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    close(masked_mean(x, mask), 3.0)
    close(masked_var(x, mask), 2.5)  # (4 + 1 + 0 + 1 + 4) / 4
    close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    whitened = masked_whiten(x, mask)
    expected = (real - real.mean()) / torch.sqrt(real.var(unbiased=True) + 1e-8)
    close(whitened[mask > 0], expected)
    assert torch.all(whitened[mask == 0] == 0)
    close(masked_whiten(x, mask, shift_mean=False)[mask > 0], expected + 3.0)


LOG_OLD = torch.log(torch.tensor([[0.2, 0.4, 0.5, 0.3]]))
RATIOS = torch.tensor([[1.5, 0.5, 1.1, 7.0]])  # position 3 is padding
ADVANTAGES = torch.tensor([[1.0, -2.0, 3.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0]]).float()


def test_clipped_policy_loss_by_hand():
    loss, stats = clipped_policy_loss(LOG_OLD + torch.log(RATIOS), LOG_OLD, ADVANTAGES, MASK, clip_eps=0.2)
    # t0: max(−1.5, −1.2) = −1.2 (clipped); t1: max(1.0, 1.6) = 1.6 (clipped); t2: −3.3 (ratio inside)
    close(loss, (-1.2 + 1.6 - 3.3) / 3)
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert stats["approx_kl"] == pytest.approx(sum(k3) / 3, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(3.1 / 3, abs=1e-6)
    assert (stats["ratio_min"], stats["ratio_max"]) == (pytest.approx(0.5), pytest.approx(1.5))


def test_policy_loss_asymmetric_clip_and_is_weights():
    logprobs = LOG_OLD + torch.log(RATIOS)
    loss, _ = clipped_policy_loss(logprobs, LOG_OLD, ADVANTAGES, MASK, clip_eps=0.2, clip_eps_high=0.6)
    close(loss, (-1.5 + 1.6 - 3.3) / 3)  # t0's ratio 1.5 is now inside [0.8, 1.6]
    weights = torch.tensor([[0.5, 2.0, 1.0, 0.0]])
    loss, _ = clipped_policy_loss(logprobs, LOG_OLD, ADVANTAGES, MASK, clip_eps=0.2, is_weights=weights)
    close(loss, (-0.6 + 3.2 - 3.3) / 3)


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    logprobs = (LOG_OLD + torch.log(RATIOS)).requires_grad_()
    loss, _ = clipped_policy_loss(logprobs, LOG_OLD, ADVANTAGES, MASK, clip_eps=0.2)
    loss.backward()
    # d/dlogp of −A·ratio/3 = −A·ratio/3 at t2 only: −3·1.1/3
    close(logprobs.grad, [[0.0, 0.0, -1.1, 0.0]])


def test_truncated_is_weights():
    dense = torch.log(torch.tensor([[0.3, 0.9, 0.2, 0.5]]))
    sampler = torch.log(torch.tensor([[0.6, 0.3, 0.2, 0.1]]))
    close(truncated_is_weights(dense, sampler, MASK, cap=2.0), [[0.5, 2.0, 1.0, 0.0]])


def test_sampler_mismatch_estimates_kl_of_the_sampler_from_its_own_samples():
    """k3 on tokens drawn from q matches the exact KL(q || p) of two small distributions."""
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((q * (q / p).log()).sum())
    draws = torch.multinomial(q, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    dense, sampler = p.log()[draws][None], q.log()[draws][None]
    out = sampler_mismatch(dense, sampler, torch.ones_like(dense), cap=2.0)
    assert out["sampler_kl"] == pytest.approx(exact, rel=0.02)
    assert out["is_capped_frac"] == pytest.approx(0.05, abs=0.005)  # p/q is 0.5, 5/6, 5/3, 5: only the last
    at_one_and_a_half = sampler_mismatch(dense, sampler, torch.ones_like(dense), cap=1.5)
    assert at_one_and_a_half["is_capped_frac"] == pytest.approx(0.20, abs=0.005)  # the last two
    same = sampler_mismatch(sampler, sampler, torch.ones_like(dense))
    assert same == {"sampler_kl": 0.0, "is_capped_frac": 0.0}
    masked_out = sampler_mismatch(dense, sampler, torch.zeros_like(dense))
    assert masked_out == {"sampler_kl": 0.0, "is_capped_frac": 0.0}


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0, 50.0]])
    old_values = torch.tensor([[0.5, 2.5, 0.1, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    loss, stats = clipped_value_loss(values, old_values, returns, MASK, clip_eps=0.2)
    # t0: max((1−2)², (0.7−2)²) = 1.69; t1: max(1, (2.3−1)²) = 1.69; t2: max(0, (0.0−0)²) = 0
    close(loss, 0.5 * (1.69 + 1.69 + 0.0) / 3)
    assert stats["value_clip_frac"] == pytest.approx(2 / 3)
    loss, _ = clipped_value_loss(values, old_values, returns, MASK, clip_eps=None)
    close(loss, 0.5 * (1 + 1 + 0) / 3)


def test_entropy_from_logits_and_bonus():
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 1e-30]]))
    entropy = entropy_from_logits(logits)
    close(entropy, [math.log(4), -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))])
    mask = torch.tensor([1.0, 0.0])
    close(entropy_bonus(entropy, mask, coef=0.01), 0.01 * math.log(4))


def test_registries():
    assert ADVANTAGE_ESTIMATORS.get("gae") is gae_advantages
    assert POLICY_LOSSES.get("ppo_clip") is clipped_policy_loss
    with pytest.raises(KeyError, match="unknown policy loss 'grpo'"):
        POLICY_LOSSES.get("grpo")
