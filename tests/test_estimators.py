"""The critic-free advantage estimators (REINFORCE++, RLOO, GRPO) against hand-computed numbers,
what each needs (critic, group size), and the job-file check that enforces the group size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rto.config import load_config
from rto.errors import UserError
from rto.ppo.algo import (
    ADVANTAGE_ESTIMATORS,
    GROUP_STD_EPS,
    critic_free,
    estimator_min_group,
    estimator_needs_critic,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

CRITIC_FREE = ["reinforce_pp", "rloo", "grpo"]

# B = 4 rows in two prompt groups of 2 (rows 0-1, rows 2-3), R = 3; responses of length 3, 2, 1, 3.
# Padding carries garbage rewards that must be ignored.
REWARDS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 9.0], [2.0, 5.0, 7.0], [1.0, 1.0, 1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])

# Reward-to-go G_t = Σ_{k≥t} γ^{k−t} r_k.
#   γ = 1:   row 0: 1+2+3, 2+3, 3;  row 1: 0+4, 4;  row 2: 2;  row 3: 3, 2, 1
#   γ = 0.5: row 0: 1 + 0.5·(2 + 0.5·3) = 2.75, 2 + 0.5·3 = 3.5, 3;  row 1: 0 + 0.5·4 = 2, 4;
#            row 2: 2;  row 3: 1 + 0.5·1.5 = 1.75, 1 + 0.5 = 1.5, 1
RETURNS = {
    1.0: [[6.0, 5.0, 3.0], [4.0, 4.0, 0.0], [2.0, 0.0, 0.0], [3.0, 2.0, 1.0]],
    0.5: [[2.75, 3.5, 3.0], [2.0, 4.0, 0.0], [2.0, 0.0, 0.0], [1.75, 1.5, 1.0]],
}


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0
    )


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_reinforce_pp_is_the_reward_to_go(gamma):
    advantages, returns = reinforce_pp_advantages(REWARDS, None, MASK, gamma=gamma, group_size=2)
    close(advantages, RETURNS[gamma])
    close(returns, RETURNS[gamma])


def test_rloo_by_hand():
    # Groups of 2: each row's baseline is the other row's total return G_{j,0}.
    # γ = 1: totals 6, 4 | 2, 3 → baselines 4, 6 | 3, 2.
    advantages, returns = rloo_advantages(REWARDS, None, MASK, gamma=1.0, group_size=2)
    close(advantages, [[2.0, 1.0, -1.0], [-2.0, -2.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    close(returns, RETURNS[1.0])
    # γ = 0.5: totals 2.75, 2 | 2, 1.75 → baselines 2, 2.75 | 1.75, 2.
    advantages, returns = rloo_advantages(REWARDS, None, MASK, gamma=0.5, group_size=2)
    close(advantages, [[0.75, 1.5, 1.0], [-0.75, 1.25, 0.0], [0.25, 0.0, 0.0], [-0.25, -0.5, -1.0]])
    close(returns, RETURNS[0.5])


def test_rloo_baseline_is_the_mean_of_the_others():
    # One group of 4, γ = 1: totals 6, 4, 2, 3 (sum 15) → baselines (15 − G_i)/3 = 3, 11/3, 13/3, 4.
    advantages, _ = rloo_advantages(REWARDS, None, MASK, gamma=1.0, group_size=4)
    close(
        advantages,
        [[3.0, 2.0, 0.0], [1 / 3, 1 / 3, 0.0], [2 - 13 / 3, 0.0, 0.0], [-1.0, -2.0, -3.0]],
    )


def test_grpo_by_hand():
    # Group 0 (rows 0-1) masked rewards 1, 2, 3, 0, 4: mean 2, Bessel var (1+0+1+4+4)/4 = 2.5.
    # Group 1 (rows 2-3) masked rewards 2, 1, 1, 1: mean 1.25, Bessel var (0.5625 + 3·0.0625)/3 = 0.25.
    # (The population std would give sqrt(2) and sqrt(0.1875): different numbers.)
    s0 = math.sqrt(2.5) + GROUP_STD_EPS
    s1 = 0.5 + GROUP_STD_EPS
    # normalised: row 0 (−1, 0, 1)/s0, row 1 (−2, 2)/s0, row 2 (0.75)/s1, row 3 (−0.25 ×3)/s1
    advantages, returns = grpo_advantages(REWARDS, None, MASK, gamma=1.0, group_size=2)
    close(
        advantages,
        [
            [0.0, 1 / s0, 1 / s0],
            [0.0, 2 / s0, 0.0],
            [0.75 / s1, 0.0, 0.0],
            [-0.75 / s1, -0.5 / s1, -0.25 / s1],
        ],
    )
    close(returns, RETURNS[1.0])  # unnormalised
    # γ = 0.5: row 0: t1 = 0 + 0.5·1, t0 = −1 + 0.5·0.5; row 1: t0 = −2 + 0.5·2;
    # row 3: t1 = −0.25 − 0.125, t0 = −0.25 − 0.1875
    advantages, returns = grpo_advantages(REWARDS, None, MASK, gamma=0.5, group_size=2)
    close(
        advantages,
        [
            [-0.75 / s0, 0.5 / s0, 1 / s0],
            [-1 / s0, 2 / s0, 0.0],
            [0.75 / s1, 0.0, 0.0],
            [-0.4375 / s1, -0.375 / s1, -0.25 / s1],
        ],
    )
    close(returns, RETURNS[0.5])


@pytest.mark.parametrize("name", CRITIC_FREE)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_masked_positions_are_zero_and_values_are_ignored(name, gamma):
    padded = REWARDS.clone()
    padded[MASK == 0] = 1e4
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    advantages, returns = estimator(padded, None, MASK, gamma=gamma, group_size=2)
    assert torch.all(advantages[MASK == 0] == 0) and torch.all(returns[MASK == 0] == 0)
    same_advantages, same_returns = estimator(
        REWARDS, torch.randn(4, 3), MASK, gamma=gamma, lam=0.3, group_size=2
    )
    close(advantages, same_advantages)
    close(returns, same_returns)


def test_rloo_with_a_sentence_reward_is_classic_rloo():
    generator = torch.Generator().manual_seed(0)
    k, groups, length = 3, 2, 5
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    scores = torch.randn(groups * k, generator=generator)
    rewards = torch.zeros(groups * k, length)
    rewards[torch.arange(groups * k), lengths - 1] = scores  # only the last token is rewarded
    advantages, _ = rloo_advantages(rewards, None, mask, gamma=1.0, group_size=k)
    # RLOO (Ahmadian et al. 2024): A_i = s_i − mean_{j≠i} s_j = k/(k−1)·(s_i − mean of the group)
    group_mean = scores.view(groups, k).mean(dim=1).repeat_interleave(k)
    expected = (k / (k - 1) * (scores - group_mean))[:, None] * mask
    close(advantages, expected, atol=1e-5)


def test_a_group_of_identical_rewards_has_zero_advantages():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    same_token_rewards = torch.full((4, 3), 0.7)  # every token of a group has the same reward
    advantages, _ = grpo_advantages(same_token_rewards, None, mask, gamma=0.5, group_size=2)
    assert torch.all(advantages == 0)
    sentence = torch.zeros(4, 3)  # each group's samples all get the same sentence reward
    sentence[0, 2], sentence[1, 1], sentence[2, 2], sentence[3, 0] = 1.5, 1.5, -2.0, -2.0
    advantages, returns = rloo_advantages(sentence, None, mask, gamma=1.0, group_size=2)
    assert torch.all(advantages == 0) and returns.abs().sum() > 0


@pytest.mark.parametrize("estimator", [rloo_advantages, grpo_advantages])
def test_groups_must_tile_the_batch(estimator):
    with pytest.raises(ValueError, match="multiple of group_size"):
        estimator(REWARDS[:3], None, MASK[:3], group_size=2)
    with pytest.raises(ValueError, match="at least 2"):
        estimator(REWARDS, None, MASK, group_size=1)


def test_gae_accepts_and_ignores_group_size():
    values = torch.tensor([[0.5, 1.0, 1.5], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    plain = gae_advantages(REWARDS, values, MASK, gamma=0.9, lam=0.8)
    grouped = gae_advantages(REWARDS, values, MASK, gamma=0.9, lam=0.8, group_size=2)
    close(plain[0], grouped[0])
    close(plain[1], grouped[1])


def test_what_each_estimator_needs():
    assert estimator_needs_critic("gae") and estimator_min_group("gae") == 1
    assert [estimator_needs_critic(name) for name in CRITIC_FREE] == [False, False, False]
    assert [estimator_min_group(name) for name in CRITIC_FREE] == [1, 2, 2]
    with pytest.raises(KeyError):
        estimator_needs_critic("td0")


def test_a_user_estimator_needs_the_critic_unless_declared():
    @ADVANTAGE_ESTIMATORS.register("test_plain")
    def plain(*args, **kwargs):
        return gae_advantages(*args, **kwargs)

    @ADVANTAGE_ESTIMATORS.register("test_free")
    @critic_free(min_group=3)
    def free(*args, **kwargs):
        return reinforce_pp_advantages(*args, **kwargs)

    try:
        assert estimator_needs_critic("test_plain") and estimator_min_group("test_plain") == 1
        assert not estimator_needs_critic("test_free") and estimator_min_group("test_free") == 3
    finally:
        ADVANTAGE_ESTIMATORS._functions.pop("test_plain", None)
        ADVANTAGE_ESTIMATORS._functions.pop("test_free", None)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_a_group_estimator_needs_several_samples_per_prompt(tmp_path, name):
    path = write(tmp_path, f"stages: [ppo]\nppo: {{advantage_estimator: {name}, samples_per_prompt: 1}}\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and info.value.exit_code == 2
    for word in ("ppo.samples_per_prompt", f"ppo.advantage_estimator '{name}'", ">= 2", "(now 1)"):
        assert word in message, (word, message)
    path = write(tmp_path, f"stages: [ppo]\nppo: {{advantage_estimator: {name}, samples_per_prompt: 2}}\n")
    cfg = load_config(path)
    assert cfg.ppo.samples_per_prompt == 2 and not cfg.ppo.uses_critic


def test_uses_critic_follows_the_estimator(tmp_path):
    assert load_config(write(tmp_path, "stages: [ppo]\n")).ppo.uses_critic
    cfg = load_config(write(tmp_path, "stages: [ppo]\nppo: {advantage_estimator: reinforce_pp}\n"))
    assert cfg.ppo.samples_per_prompt == 1 and not cfg.ppo.uses_critic
