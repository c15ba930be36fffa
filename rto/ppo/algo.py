"""PPO math as pure functions on response-aligned `[B, R]` tensors (see reward/compose.py for the
convention): `response_mask [B, R]` is 1 on real response tokens (up to and including EOS), 0 after.

Read top to bottom: masked statistics and whitening → advantage estimators (GAE; what an
estimator needs: `critic_free`, `estimator_needs_critic`, `estimator_min_group`; the reward-to-go
and the critic-free estimators REINFORCE++, RLOO, GRPO) → policy loss (clipped PPO, optionally
weighted by truncated importance sampling for pruned-sampler rollouts) → value loss → entropy.
Estimators and policy losses sit behind small registries (verl style).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from rto.registry import Registry

# ---------------------------------------------------------------- masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (0 when the mask is empty)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    count = mask.sum()
    sum_sq = masked_sum((x - mean) ** 2, mask)
    if unbiased:
        return sum_sq / (count - 1).clamp_min(1)
    return sum_sq / count.clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean)/sqrt(var + eps) with masked mean/var; zero where mask is 0. With
    shift_mean=False the mean is added back (scale only, as for reward normalisation)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------- advantage estimators

AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("gae")
@torch.no_grad()
def gae_advantages(
    token_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over `[B, R]` rewards and values.

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1}, with V and A taken as 0 past the last
    response token (no bootstrap: the episode ends there). Values/rewards after the mask are ignored.
    Returns (advantages [B, R], returns [B, R] = advantages + values), zero where mask is 0.
    `group_size` is accepted for the common estimator signature and ignored.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    token_rewards = token_rewards * mask
    advantages_reversed: list[Tensor] = []
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages, returns


# Critic-free estimators: the baseline comes from the other samples of the same prompt (or from
# whitening over the batch), not from a value model. Rows are grouped by prompt in consecutive
# blocks of `group_size` (row i belongs to group i // group_size), as the trainer lays them out.

F = TypeVar("F", bound=Callable)
GROUP_STD_EPS = 1e-6  # added to a group's reward std in GRPO (a group of equal rewards gives 0)


def critic_free(min_group: int = 1) -> Callable[[F], F]:
    """Declare the estimator it decorates (under its `@ADVANTAGE_ESTIMATORS.register`) as needing no
    critic, and at least `min_group` samples per prompt. An estimator registered without it counts
    as needing the critic (GAE's case). The marks are attributes of the registered function."""

    def mark(function: F) -> F:
        function.needs_critic = False  # type: ignore[attr-defined]
        function.min_group = min_group  # type: ignore[attr-defined]
        return function

    return mark


def estimator_needs_critic(name: str) -> bool:
    """Whether the registered estimator `name` reads the critic's values (True unless declared
    `critic_free`): without one the trainer builds no critic group and skips the value loss."""
    return getattr(ADVANTAGE_ESTIMATORS.get(name), "needs_critic", True)


def estimator_min_group(name: str) -> int:
    """The fewest samples per prompt (`ppo.samples_per_prompt`) the estimator `name` works with."""
    return getattr(ADVANTAGE_ESTIMATORS.get(name), "min_group", 1)


def _check_groups(batch: int, group_size: int, min_group: int, name: str) -> int:
    """The number of prompt groups in a batch of `batch` rows; ValueError if they do not tile it."""
    if group_size < min_group:
        raise ValueError(f"{name} needs groups of at least {min_group} samples per prompt, got {group_size}")
    if batch % group_size:
        raise ValueError(f"{name}: batch of {batch} rows is not a multiple of group_size {group_size}")
    return batch // group_size


def reward_to_go(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """[B, R] G_t = Σ_{k≥t} γ^{k−t}·r_k over masked tokens k (no λ, no critic); zero where mask is 0."""
    mask = response_mask.to(token_rewards.dtype)
    rewards = token_rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns: list[Tensor] = []
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        reversed_returns.append(running * mask[:, t])
    return torch.stack(reversed_returns[::-1], dim=1)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
@critic_free()
@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: Tensor,
    values: Tensor | None,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu, arXiv 2501.03262, 2025; OpenRLHF's `reinforce`): advantages = returns = G_t,
    the reward-to-go. Its baseline is the batch whitening the trainer applies afterwards when
    `ppo.whiten_advantages` is on (as for GAE). `values`, `lam` and `group_size` are ignored."""
    returns = reward_to_go(token_rewards, response_mask, gamma)
    return returns.clone(), returns


@ADVANTAGE_ESTIMATORS.register("rloo")
@critic_free(min_group=2)
@torch.no_grad()
def rloo_advantages(
    token_rewards: Tensor,
    values: Tensor | None,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Leave-one-out baseline: A_{i,t} = G_{i,t} − mean_{j≠i in i's group} G_{j,0}, the other
    samples' total returns; returns = G. With only a sentence reward at the last token and γ = 1
    this is RLOO (Ahmadian et al., arXiv 2402.14740, 2024). Needs group_size ≥ 2; `values` and
    `lam` are ignored."""
    batch = token_rewards.size(0)
    groups = _check_groups(batch, group_size, 2, "rloo")
    returns = reward_to_go(token_rewards, response_mask, gamma)
    totals = returns[:, 0].view(groups, group_size)
    baseline = (totals.sum(dim=1, keepdim=True) - totals) / (group_size - 1)
    mask = response_mask.to(returns.dtype)
    advantages = (returns - baseline.reshape(batch, 1)) * mask
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register("grpo")
@critic_free(min_group=2)
@torch.no_grad()
def grpo_advantages(
    token_rewards: Tensor,
    values: Tensor | None,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """GRPO with process supervision (Shao et al., DeepSeekMath, arXiv 2402.03300, §4.1.3) on the
    token rewards: r̃ = (r − mean_g)/(std_g + 1e-6), with the mean and the (Bessel-corrected) std of
    all masked token rewards of the group, then A_{i,t} = Σ_{k≥t} γ^{k−t}·r̃_{i,k}; returns = G, the
    unnormalised reward-to-go. Needs group_size ≥ 2; `values` and `lam` are ignored."""
    batch, length = token_rewards.shape
    groups = _check_groups(batch, group_size, 2, "grpo")
    mask = response_mask.to(token_rewards.dtype)
    grouped_rewards = (token_rewards * mask).reshape(groups, group_size * length)
    grouped_mask = mask.reshape(groups, group_size * length)
    count = grouped_mask.sum(dim=1, keepdim=True)
    mean = grouped_rewards.sum(dim=1, keepdim=True) / count.clamp_min(1)
    sum_sq = (((grouped_rewards - mean) ** 2) * grouped_mask).sum(dim=1, keepdim=True)
    std = torch.sqrt(sum_sq / (count - 1).clamp_min(1))
    normalised = ((grouped_rewards - mean) / (std + GROUP_STD_EPS)).reshape(batch, length)
    advantages = reward_to_go(normalised, response_mask, gamma)
    return advantages, reward_to_go(token_rewards, response_mask, gamma)


# ---------------------------------------------------------------- policy losses

PolicyLoss = Callable[..., tuple[Tensor, dict[str, float]]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


@torch.no_grad()
def truncated_is_weights(
    dense_logprobs: Tensor, sampler_logprobs: Tensor, response_mask: Tensor, cap: float = 2.0
) -> Tensor:
    """[B, R] min(π_dense/π_sampler, cap) per token, for rollouts generated by a different (pruned)
    sampler than the dense policy that computes the ratio; zero where mask is 0. Detached."""
    return torch.exp(dense_logprobs - sampler_logprobs).clamp(max=cap) * response_mask


def sampler_mismatch(
    dense_logprobs: Tensor, sampler_logprobs: Tensor, response_mask: Tensor, cap: float = 2.0
) -> dict[str, float]:
    """How far a pruned sampler q is from the dense policy p on its own samples: ``sampler_kl``, the
    k3 estimate of KL(q ‖ p) (mean over tokens of r − 1 − log r with r = p/q; unbiased and never
    negative), and ``is_capped_frac``, the share of tokens whose weight p/q is cut at ``cap``."""
    keep = response_mask.bool()
    log_ratio = (dense_logprobs - sampler_logprobs)[keep]
    if log_ratio.numel() == 0:
        return {"sampler_kl": 0.0, "is_capped_frac": 0.0}
    k3 = torch.expm1(log_ratio) - log_ratio
    return {
        "sampler_kl": float(k3.mean()),
        "is_capped_frac": float((log_ratio > math.log(cap)).float().mean()),
    }


@POLICY_LOSSES.register("ppo_clip")
def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate, token-mean over the mask.

    ratio = exp(log π − log π_old); loss_t = max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε_high)),
    multiplied per token by `is_weights` when given (truncated importance sampling).
    Stats: clip_frac, approx_kl (k3: (ratio − 1) − log ratio), ratio mean/min/max.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    loss_per_token = torch.maximum(loss_unclipped, loss_clipped)
    if is_weights is not None:
        loss_per_token = loss_per_token * is_weights
    loss = masked_mean(loss_per_token, response_mask)
    with torch.no_grad():
        bool_mask = response_mask > 0
        real_ratio = ratio[bool_mask] if bool_mask.any() else torch.ones(1, dtype=ratio.dtype)
        stats = {
            "clip_frac": masked_mean((loss_clipped > loss_unclipped).to(ratio.dtype), response_mask).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, response_mask).item(),
            "ratio_mean": real_ratio.mean().item(),
            "ratio_min": real_ratio.min().item(),
            "ratio_max": real_ratio.max().item(),
        }
    return loss, stats


# ---------------------------------------------------------------- value loss, entropy


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip_eps: float | None = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """0.5·max((V − G)², (V_old + clip(V − V_old, ±ε) − G)²), token-mean over the mask
    (OpenRLHF/CleanRL). clip_eps=None gives the plain 0.5·(V − G)²."""
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        per_token, clip_frac = unclipped, torch.zeros(())
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (values_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).to(values.dtype), response_mask)
    loss = 0.5 * masked_mean(per_token, response_mask)
    return loss, {"value_clip_frac": float(clip_frac)}


def entropy_bonus(entropy: Tensor, response_mask: Tensor, coef: float) -> Tensor:
    """coef · masked mean entropy; subtract it from the policy loss to encourage exploration."""
    return coef * masked_mean(entropy, response_mask)
