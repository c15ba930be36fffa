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
