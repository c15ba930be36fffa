"""Small pieces of the PPO loop that do not need Ray."""

from __future__ import annotations

import torch
from transformers import AutoModelForTokenClassification, LlamaConfig

from rto.ppo.losses import critic_values
from rto.ppo.trainer import all_finite, prompt_indices


def test_prompt_stream_is_a_resumable_sequence_of_shuffles():
    stream = prompt_indices(0, 30, 10, seed=1)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch has its own order
    assert prompt_indices(13, 5, 10, seed=1) == stream[13:18]  # resuming mid-epoch continues exactly
    assert prompt_indices(0, 10, 10, seed=2) != stream[:10]


def test_critic_value_of_a_token_is_read_before_the_token():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    model = AutoModelForTokenClassification.from_config(config).eval()
    # prompt [5, 6] left-padded to 3; response [7, 8] then padding
    sequences = torch.tensor([[0, 5, 6, 7, 8, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0]])
    values = critic_values(model, sequences, mask, prompt_len=3)
    unpadded = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, :, 0]
    assert values.shape == (1, 3)
    torch.testing.assert_close(values[0, :2], unpadded[1:3], atol=1e-5, rtol=1e-4)  # states after "6" and "7"
    assert values[0, 2] == 0  # padding gets no value


def test_all_finite_looks_only_inside_the_mask():
    mask = torch.tensor([[1, 1, 0]])
    assert all_finite(mask, torch.tensor([[1.0, 2.0, float("nan")]]))
    assert not all_finite(mask, torch.tensor([[1.0, float("inf"), 0.0]]))
    assert not all_finite(mask, torch.tensor([float("nan")]))  # per-sample tensors are checked whole


def test_trimmed_batch_scores_and_trains_like_the_padded_one():
    """Cutting the response columns past the longest real response changes no log-prob, value,
    entropy or loss (issue 19: no compute on padding)."""
    from transformers import AutoModelForCausalLM

    from rto.ppo.losses import policy_loss, policy_scores, value_loss
    from rto.ppo.trainer import trim_responses

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    policy = AutoModelForCausalLM.from_config(config).eval()
    critic = AutoModelForTokenClassification.from_config(config).eval()
    prompt_len, width = 3, 8
    lengths = [5, 2, 4]  # the longest real response is 5 of 8 columns
    prompts = torch.tensor([[0, 4, 5], [6, 7, 8], [0, 0, 9]])
    response = torch.randint(1, 30, (3, width))
    response_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    response = torch.where(response_mask.bool(), response, 0)
    samples = {
        "sequences": torch.cat([prompts, response], 1),
        "attention_mask": torch.cat([(prompts != 0).long(), response_mask], 1),
        "response_mask": response_mask,
        "sampler_logprobs": torch.randn(3, width) * response_mask,
    }
    trimmed = trim_responses(samples, prompt_len)
    assert trimmed["sequences"].shape == (3, prompt_len + 5) and trimmed["response_mask"].shape == (3, 5)
    assert trim_responses(trimmed, prompt_len) is trimmed  # nothing left to cut

    def run(batch):
        mask = batch["response_mask"].float()
        common = dict(
            sequences=batch["sequences"], attention_mask=batch["attention_mask"], prompt_len=prompt_len
        )
        scores = policy_scores(policy, **common, temperature=0.7)
        old = scores["sampling_logprobs"] - 0.3 * mask  # ratio 1.35: clipping is exercised
        advantages = torch.linspace(-1, 1, 3 * width).view(3, width)[:, : mask.size(1)] * mask
        p_loss, p_stats = policy_loss(policy, **common, response_mask=mask, old_logprobs=old,
                                      advantages=advantages, temperature=0.7, entropy_coef=0.01)  # fmt: skip
        values = critic_values(critic, **common)
        v_loss, _ = value_loss(critic, **common, response_mask=mask, old_values=values + 0.3 * mask,
                               returns=advantages, value_clip=0.2)  # fmt: skip
        return scores, values, p_loss, v_loss, p_stats

    padded, cut = run(samples), run(trimmed)
    for name in ("logprobs", "sampling_logprobs", "entropy"):
        torch.testing.assert_close(padded[0][name][:, :5], cut[0][name], atol=1e-5, rtol=1e-4)
        assert padded[0][name][:, 5:].abs().max() == 0
    torch.testing.assert_close(padded[1][:, :5], cut[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded[2], cut[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded[3], cut[3], atol=1e-6, rtol=1e-5)
    assert padded[4]["clip_frac"] == cut[4]["clip_frac"] > 0
