"""Token reward composition against hand-computed numbers (β1 = 0.05, c = 0.05, β2 = 0.01)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from reward.compose import REWARD_MODES, compose_token_rewards, last_token_index
from reward.config import RewardConfig

# Three responses, R = 4: row 0 ends with EOS at t=2, row 1 is truncated (no EOS, 4 real tokens),
# row 2 ends at t=1. Values at masked positions are garbage that must not leak through.
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
REF = torch.full((3, 4), -1.0)
DPO_DIFF = torch.tensor([[0.5, -2.0, 1.5, 9.0], [0.0, 0.4, -0.4, 2.0], [-0.2, 0.6, 7.0, 7.0]])
KL_DIFF = torch.tensor([[0.2, -0.1, 0.0, 5.0], [1.0, 0.0, -1.0, 0.5], [0.0, 0.3, 3.0, 3.0]])
RM_RAW = torch.tensor([3.0, -1.0, 100.0])
RM_MEAN, RM_STD = 1.0, 2.0  # normalised: [1, -1, 49.5] → clamped to ±10: [1, -1, 10]

# clip(0.05·diff, ±0.05) by hand
EXPECTED_DPO = torch.tensor([[0.025, -0.05, 0.05, 0], [0.0, 0.02, -0.02, 0.05], [-0.01, 0.03, 0, 0]])
# −0.01·(log π − log π_ref) by hand
EXPECTED_KL = torch.tensor([[-0.002, 0.001, 0.0, 0], [-0.01, 0.0, 0.01, -0.005], [0.0, -0.003, 0, 0]])
EXPECTED_RM = torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, -1.0], [0, 10.0, 0, 0]])


def compose(config: RewardConfig, **overrides):
    inputs = dict(
        response_mask=MASK,
        logprobs=REF + KL_DIFF,
        ref_logprobs=REF,
        dpo_logprobs=REF + DPO_DIFF,
        rm_scores=RM_RAW,
        rm_mean=RM_MEAN,
        rm_std=RM_STD,
    )
    inputs.update(overrides)
    return compose_token_rewards(config, **inputs)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_rto_mode():
    out = compose(RewardConfig())
    close(out.reward_dpo, EXPECTED_DPO)
    close(out.reward_kl, EXPECTED_KL)
    close(out.reward_rm, EXPECTED_RM)
    close(out.rm_score, torch.tensor([1.0, -1.0, 10.0]))
    close(
        out.reward,
        torch.tensor([[0.023, -0.049, 1.05, 0], [-0.01, 0.02, -0.01, -0.955], [-0.01, 10.027, 0, 0]]),
    )


def test_ppo_mode_has_no_dpo_term():
    out = compose(RewardConfig(mode="ppo"), dpo_logprobs=None)
    close(out.reward_dpo, torch.zeros(3, 4))
    close(out.reward, EXPECTED_KL + EXPECTED_RM)


def test_dpo_mode_has_no_rm_term():
    out = compose(RewardConfig(mode="dpo"), rm_scores=None, rm_mean=None, rm_std=None)
    close(out.reward_rm, torch.zeros(3, 4))
    close(out.rm_score, torch.zeros(3))
    close(
        out.reward,
        torch.tensor([[0.023, -0.049, 0.05, 0], [-0.01, 0.02, -0.01, 0.045], [-0.01, 0.027, 0, 0]]),
    )


def test_paper_clip_applies_to_the_unscaled_log_ratio():
    # β1·clip(diff, ±1): 0.05·[0.5, −1, 1] etc.
    out = compose(RewardConfig(clip=1.0, clip_scaled=False))
    close(out.reward_dpo[0], torch.tensor([0.025, -0.05, 0.05, 0]))
    close(out.reward_dpo[1], torch.tensor([0.0, 0.02, -0.02, 0.05]))
    close(out.reward_dpo[2], torch.tensor([-0.01, 0.03, 0, 0]))
    # and with the default c = 0.05, the paper's clip is far tighter than the script's: 0.05·0.05
    out = compose(RewardConfig(clip_scaled=False))
    close(out.reward_dpo[0], torch.tensor([0.0025, -0.0025, 0.0025, 0]))


def test_rm_without_normalisation_and_beta3_and_clamp():
    out = compose(RewardConfig(rm_normalize=False, beta3=2.0, rm_clamp=5.0), rm_mean=None, rm_std=None)
    close(out.rm_score, torch.tensor([6.0, -2.0, 10.0]))  # 2·clamp([3, −1, 100], ±5)
    close(out.reward_rm, torch.tensor([[0, 0, 6.0, 0], [0, 0, 0, -2.0], [0, 10.0, 0, 0]]))


def test_last_token_placement_and_empty_rows():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 0, 0]
    zeros = torch.zeros(4, 4)
    out = compose_token_rewards(
        RewardConfig(mode="ppo", rm_normalize=False),
        response_mask=mask,
        logprobs=zeros,
        ref_logprobs=zeros,
        rm_scores=torch.tensor([1.0, 2.0, 3.0, 4.0]),
    )
    close(out.reward, torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 2.0], [3.0, 0, 0, 0], [0, 0, 0, 0]]))
    close(out.rm_score, torch.tensor([1.0, 2.0, 3.0, 0.0]))  # nothing was added to the empty row


def test_components_are_zero_outside_the_mask_and_sum_to_reward():
    out = compose(RewardConfig())
    for tensor in (out.reward, out.reward_dpo, out.reward_kl, out.reward_rm):
        assert torch.all(tensor[MASK == 0] == 0)
    close(out.reward, out.reward_dpo + out.reward_kl + out.reward_rm)


def test_input_validation():
    with pytest.raises(ValueError, match="needs dpo_logprobs"):
        compose(RewardConfig(), dpo_logprobs=None)
    with pytest.raises(ValueError, match="needs rm_scores"):
        compose(RewardConfig(mode="ppo"), rm_scores=None)
    with pytest.raises(ValueError, match="rm_mean"):
        compose(RewardConfig(), rm_mean=None)
    with pytest.raises(ValueError, match="rm_std"):
        compose(RewardConfig(), rm_std=0.0)
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        compose(RewardConfig(), ref_logprobs=REF[:, :3])
    with pytest.raises(ValueError, match="rm_scores has shape"):
        compose(RewardConfig(), rm_scores=RM_RAW[:2])
    with pytest.raises(ValueError, match="1…1 then 0…0"):
        compose(RewardConfig(), response_mask=torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]))


def test_semi_rto_mode_sums_each_sentence_onto_its_delimiter():
    """Row 0 ends a sentence at t=1: (0.025 − 0.05) there, 0.05 at the last token; row 1 at t=0 and
    t=3: 0 and (0.02 − 0.02 + 0.05); row 2 has no delimiter inside its mask (the one at t=3 is
    padding): its whole sum 0.02 at its last token, t=1."""
    ends = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1]])
    out = compose(RewardConfig(mode="semi_rto"), sentence_ends=ends)
    close(out.reward_dpo, torch.tensor([[0, -0.025, 0.05, 0], [0, 0, 0, 0.05], [0, 0.02, 0, 0]]))
    close(out.reward_kl, EXPECTED_KL)
    close(out.reward_rm, EXPECTED_RM)
    close(out.reward.sum(1), compose(RewardConfig()).reward.sum(1))
    with pytest.raises(ValueError, match="sentence_ends"):
        compose(RewardConfig(mode="semi_rto"))


def test_delimiter_tokens_are_found_in_the_vocabulary():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reward.compose import delimiter_token_ids, sentence_end_mask

    vocab = {"<eos>": 0, "cat": 1, ".": 2, "warm!": 3, "?\n": 4, "dog": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    ids = delimiter_token_ids(tokenizer, [".", "!", "?"])
    assert ids.tolist() == [2, 3, 4]  # "." , "warm!" and "?\n"; not the special EOS
    tokens = torch.tensor([[1, 2, 5, 3], [5, 4, 0, 2]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    assert sentence_end_mask(tokens, ids, mask).tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]


def test_delayed_mode_gives_the_dpo_sum_at_the_last_token():
    """The RTO paper's delayed-DPO ablation: Σ_h DPO_h (0.025, 0.05, 0.02 by hand) at each row's last
    token; KL per token and the RM score as in `rto`, so each response's total is `rto`'s."""
    out = compose(RewardConfig(mode="delayed"))
    close(out.reward_dpo, torch.tensor([[0, 0, 0.025, 0], [0, 0, 0, 0.05], [0, 0.02, 0, 0]]))
    close(out.reward_kl, EXPECTED_KL)
    close(out.reward_rm, EXPECTED_RM)
    close(
        out.reward,
        torch.tensor([[-0.002, 0.001, 1.025, 0], [-0.01, 0.0, 0.01, -0.955], [0.0, 10.017, 0, 0]]),
    )
    close(out.reward.sum(1), compose(RewardConfig()).reward.sum(1))


def test_rs_ppo_mode_cancels_the_dpo_term_over_each_response():
    """`rto` minus Σ_h DPO_h at the last token: the DPO terms of a response sum to 0, so its total
    is the sentence-level one plus the KL (`ppo`'s), and only their timing differs."""
    out = compose(RewardConfig(mode="rs_ppo"))
    close(
        out.reward_dpo, torch.tensor([[0.025, -0.05, 0.025, 0], [0.0, 0.02, -0.02, 0.0], [-0.01, 0.01, 0, 0]])
    )
    close(out.reward_dpo.sum(1), torch.zeros(3))
    close(
        out.reward,
        torch.tensor([[0.023, -0.049, 1.025, 0], [-0.01, 0.02, -0.01, -1.005], [-0.01, 10.007, 0, 0]]),
    )
    sentence = compose(RewardConfig(mode="ppo"), dpo_logprobs=None)
    close(out.reward.sum(1), sentence.reward.sum(1))
    close(out.reward, out.reward_dpo + out.reward_kl + out.reward_rm)


def test_registry_holds_the_modes():
    assert REWARD_MODES.names() == ["delayed", "dpo", "ppo", "rs_ppo", "rto", "semi_rto"]
    with pytest.raises(KeyError, match="unknown reward mode"):
        REWARD_MODES.get("grpo")


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"mode": "rto", "beta1": 0.0}, "beta1"),
        ({"mode": "dpo", "beta1": -0.1}, "beta1"),
        ({"mode": "rto", "beta3": 0.0}, "beta3"),
        ({"mode": "ppo", "beta3": -1.0}, "beta3"),
        ({"mode": "delayed", "beta1": 0.0}, "beta1"),
        ({"mode": "rs_ppo", "beta3": 0.0}, "beta3"),
        ({"beta2": -0.01}, "beta2"),
        ({"clip": 0.0}, "clip"),
        ({"rm_clamp": 0.0}, "rm_clamp"),
        ({"mode": "grpo"}, "mode"),
        ({"beta4": 1.0}, "beta4"),
    ],
)
def test_config_rejects_bad_combinations(settings, field):
    with pytest.raises(ValidationError, match=field):
        RewardConfig(**settings)


def test_config_defaults_and_needs():
    config = RewardConfig()
    assert (config.beta1, config.clip, config.beta2, config.beta3) == (0.05, 0.05, 0.01, 1.0)
    assert config.needs_rm and config.needs_dpo
    ppo = RewardConfig(mode="ppo")
    assert ppo.beta1 == 0.0 and ppo.needs_rm and not ppo.needs_dpo
    assert RewardConfig(mode="ppo", beta1=0).beta1 == 0.0
    assert RewardConfig(mode="ppo", beta1=0.1).beta1 == 0.0  # rto -> ppo is one override
    assert RewardConfig(mode="dpo", beta3=2.0).needs_rm is False
    dpo = RewardConfig(mode="dpo")
    assert dpo.needs_dpo and not dpo.needs_rm
    for mode in ("semi_rto", "delayed", "rs_ppo"):  # the paper's variants use every term rto uses
        variant = RewardConfig(mode=mode)
        assert variant.needs_dpo and variant.needs_rm and variant.uses_sentence_score
    for config in (RewardConfig(), ppo, dpo):  # a resolved (dumped) config validates again
        assert RewardConfig(**config.model_dump()) == config


TERMINATED = torch.tensor([True, False, True])  # row 1 was cut at the length limit (no EOS)


def test_missing_eos_score_keeps_the_sentence_score_of_a_cut_response():
    out = compose(RewardConfig(missing_eos="score"), terminated=TERMINATED)
    close(out.reward_rm, EXPECTED_RM)


def test_missing_eos_penalty_replaces_the_sentence_score_of_a_cut_response():
    out = compose(RewardConfig(missing_eos="penalty", missing_eos_penalty=-2.5), terminated=TERMINATED)
    close(out.rm_score, torch.tensor([1.0, -2.5, 10.0]))  # as is: not normalised, scaled or clamped
    close(out.reward_rm, torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, -2.5], [0, 10.0, 0, 0]]))
    close(out.reward, out.reward_dpo + out.reward_kl + out.reward_rm)
    with pytest.raises(ValueError, match="terminated"):
        compose(RewardConfig(missing_eos="penalty"))


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"mode": "dpo", "missing_eos": "penalty"}, "mode 'dpo' adds no sentence-level score"),
        ({"missing_eos": "drop"}, "'score' or 'penalty'"),
        ({"missing_eos_penalty": float("nan")}, "finite"),
    ],
)
def test_missing_eos_settings_that_cannot_work(settings, field):
    with pytest.raises(ValidationError, match=field):
        RewardConfig(**settings)


def test_batch_rewards_takes_the_sentence_score_from_the_configured_source():
    """The one function the PPO step and `rto score` both call: the RM's raw score is normalised,
    the ground truth is used as is, and the trace's rm_score column follows the mode."""
    from reward.compose import batch_rewards, rm_score_column

    common = dict(
        response_mask=MASK,
        logprobs=REF + KL_DIFF,
        ref_logprobs=REF,
        dpo_logprobs=REF + DPO_DIFF,
        terminated=TERMINATED,
        rm_mean=RM_MEAN,
        rm_std=RM_STD,
    )
    from_rm = batch_rewards(RewardConfig(), rm_scores=RM_RAW, gt_rewards=None, **common)
    close(from_rm.rm_score, torch.tensor([1.0, -1.0, 10.0]))
    truth = [0.5, -0.25, 2.0]
    from_gt = batch_rewards(
        RewardConfig(sentence_reward="ground_truth"), rm_scores=None, gt_rewards=truth, **common
    )
    close(from_gt.rm_score, torch.tensor(truth))
    with pytest.raises(ValueError, match="ground truth"):
        batch_rewards(
            RewardConfig(sentence_reward="ground_truth"), rm_scores=RM_RAW, gt_rewards=None, **common
        )
    assert rm_score_column(RewardConfig(sentence_reward="ground_truth"), from_gt) is from_gt.rm_score
    dpo_only = batch_rewards(RewardConfig(mode="dpo"), rm_scores=None, gt_rewards=truth, **common)
    assert rm_score_column(RewardConfig(mode="dpo"), dpo_only) is None


def test_separation_by_ground_truth_ranks_response_sums():
    from reward.compose import separation_by_ground_truth

    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    term = torch.tensor([[0.2, 0.1, 9.0], [0.5, 9.0, 9.0], [-0.1, 0.0, 0.0], [0.3, 0.0, 0.0]])
    # sums over the response tokens only: 0.3, 0.5, -0.1, 0.3
    out = separation_by_ground_truth(term, mask, [1.0, 1.0, 0.0, 0.0])
    # right-over-wrong pairs: (0.3>-0.1) (0.3=0.3: half) (0.5>-0.1) (0.5>0.3) -> 3.5 / 4
    assert out["auc"] == pytest.approx(3.5 / 4)
    assert out["right"] == pytest.approx(0.4) and out["wrong"] == pytest.approx(0.1)
    assert separation_by_ground_truth(-term, mask, [1.0, 1.0, 0.0, 0.0])["auc"] == pytest.approx(0.5 / 4)
    # a graded ground truth: AUC over every ordered pair, no right/wrong means
    graded = separation_by_ground_truth(term, mask, [0.9, 0.5, 0.1, 0.1])
    assert set(graded) == {"auc"} and graded["auc"] == pytest.approx(3.5 / 5)
    assert separation_by_ground_truth(term, mask, [1.0] * 4) == {}  # nothing to separate
