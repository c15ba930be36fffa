"""ShortGPT baseline: block influence, layer removal, FLOPs matching."""

import pytest
import torch

from prune.ftp.forward import skipping_forward
from prune.ftp.models import random_causal_lm
from prune.shortgpt import (
    block_influence,
    flops_matched_layers,
    layers_to_remove,
    removal_schedule,
    remove_layers,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_block_influence_is_one_minus_cosine():
    model = random_causal_lm("llama")
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    bi = block_influence(model, [(ids, mask)])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=-1)
    assert bi[0] == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    assert len(bi) == 4 and all(0 <= b <= 2 for b in bi)


def test_removed_layers_are_the_least_influential():
    assert layers_to_remove([0.5, 0.1, 0.3, 0.05], 2) == [1, 3]
    assert removal_schedule(4, [1, 3]) == [0.0, 1.0, 0.0, 1.0]


def test_removed_model_matches_removal_schedule_and_generates():
    model = random_causal_lm("qwen2")
    ids = torch.randint(3, 128, (2, 10))
    pruned = remove_layers(model, [1, 2])
    assert len(pruned.model.layers) == 2 and len(model.model.layers) == 4
    with torch.no_grad():
        expected = pruned(input_ids=ids).logits
        ours = skipping_forward(model, ids, schedule=removal_schedule(4, [1, 2])).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    out = pruned.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)


def test_flops_matched_layer_count():
    config = random_causal_lm("llama", num_hidden_layers=8).config
    assert flops_matched_layers(config, 512, [0.0] * 8) == 0
    assert flops_matched_layers(config, 512, [0.5] * 8) in (4, 5)
    assert flops_matched_layers(config, 512, [0.3] * 8) in (2, 3)
