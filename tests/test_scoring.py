"""Scoring models: padded batches score exactly like unpadded single rows."""

from __future__ import annotations

import pytest
import torch
from _reward_fixtures import EOS_ID, PAD_ID, save, tiny_lm, tiny_rm, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from reward.scoring import FrozenLM, FrozenRM, check_same_tokenizer
from rto.errors import UserError
from rto.forward import position_ids_from_mask, response_logprobs, sequence_scores

# (prompt, response) pairs of different lengths; responses end in EOS except the truncated second one.
SAMPLES = [
    ([5, 6], [7, 8, 9, 10, EOS_ID]),
    ([11, 12, 13, 14], [15, 16]),
    ([17, 5, 6], [8, EOS_ID]),
]


def batch(samples=SAMPLES, pad_id: int = PAD_ID):
    """Left-padded prompts of length P followed by right-padded responses of length R."""
    prompt_len = max(len(p) for p, _ in samples)
    response_len = max(len(r) for _, r in samples)
    rows, masks = [], []
    for prompt, response in samples:
        left, right = prompt_len - len(prompt), response_len - len(response)
        rows.append([pad_id] * left + prompt + response + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
    return torch.tensor(rows), torch.tensor(masks), prompt_len


def unpadded_logprobs_and_entropy(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
    return picked, -(logprobs.exp() * logprobs).sum(-1)


def test_position_ids_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 3, 3]]


def tiny_gpt2():
    # Absolute position embeddings: unlike RoPE (relative), wrong position ids on left padding show up here.
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


@pytest.mark.parametrize("make_model", [tiny_lm, tiny_gpt2], ids=["llama", "gpt2"])
@torch.no_grad()
def test_padded_batch_equals_unpadded_rows(make_model):
    model = make_model()
    sequences, attention_mask, prompt_len = batch()
    logprobs, entropy = response_logprobs(
        model, sequences, attention_mask, prompt_len, micro_batch_size=2, return_entropy=True
    )
    assert logprobs.shape == entropy.shape == (3, 5)
    for i, (prompt, response) in enumerate(SAMPLES):
        expected_logprobs, expected_entropy = unpadded_logprobs_and_entropy(model, prompt, response)
        n = len(response)
        torch.testing.assert_close(logprobs[i, :n], expected_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[i, :n], expected_entropy, atol=1e-5, rtol=0)
        assert torch.all(logprobs[i, n:] == 0) and torch.all(entropy[i, n:] == 0)


def test_response_logprobs_is_differentiable_and_validates():
    model = tiny_lm(0)
    sequences, attention_mask, prompt_len = batch()
    response_logprobs(model, sequences, attention_mask, prompt_len).sum().backward()
    assert model.lm_head.weight.grad is not None
    with pytest.raises(ValueError, match="prompt_len"):
        response_logprobs(model, sequences, attention_mask, prompt_len=sequences.size(1))
    with pytest.raises(ValueError, match="same"):
        response_logprobs(model, sequences, attention_mask[:, 1:], prompt_len)


def test_frozen_lm_loads_from_disk(tmp_path):
    model = tiny_lm(3)
    save(model, tmp_path / "lm")
    frozen = FrozenLM(tmp_path / "lm", micro_batch_size=1)
    assert not frozen.model.training
    assert not any(p.requires_grad for p in frozen.model.parameters())
    sequences, attention_mask, prompt_len = batch()
    with torch.no_grad():
        expected = response_logprobs(model, sequences, attention_mask, prompt_len)
    torch.testing.assert_close(frozen.logprobs(sequences, attention_mask, prompt_len), expected)


def test_frozen_rm_scores_last_real_token_even_when_pad_is_eos(tmp_path):
    # pad == eos: transformers' own pooling (rightmost token != pad) would skip the EOS itself.
    model = tiny_rm(0, pad_token_id=EOS_ID)
    save(model, tmp_path / "rm")
    rm = FrozenRM(tmp_path / "rm", micro_batch_size=2)
    sequences, attention_mask, _ = batch(pad_id=EOS_ID)
    scores = rm.scores(sequences, attention_mask)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    model.config.pad_token_id = None  # batch size 1, no padding: transformers takes the last token
    with torch.no_grad():
        for i, (prompt, response) in enumerate(SAMPLES):
            expected = model(input_ids=torch.tensor([prompt + response])).logits[0, 0]
            assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(
        sequence_scores(rm.model, sequences, attention_mask, micro_batch_size=3), scores
    )


def test_missing_model_path_is_a_user_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for load in (FrozenLM, FrozenRM):
        with pytest.raises(UserError, match="no-such-model"):
            load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()  # exists, holds no model
    for load in (FrozenLM, FrozenRM):
        with pytest.raises(UserError, match="cannot read the model config of '.*empty'"):
            load(empty)


def test_check_same_tokenizer(tmp_path):
    save(tiny_tokenizer(), tmp_path / "a")
    save(tiny_tokenizer(), tmp_path / "b")
    save(tiny_tokenizer(["the", "cat", "sat", "dog"]), tmp_path / "c")
    check_same_tokenizer(tmp_path / "a", tmp_path / "b")
    with pytest.raises(UserError, match="tokenizer differs"):
        check_same_tokenizer(tmp_path / "a", tmp_path / "c")
    with pytest.raises(UserError, match="missing"):
        check_same_tokenizer(tmp_path / "a", tmp_path / "missing")
