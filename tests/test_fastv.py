"""FastV baseline and the random baseline in the pruning engine."""

from __future__ import annotations

import pytest
import torch

from pipelines.tasks import image as task
from pipelines.tasks import image_model
from prune.adaptinfer import generate_pruned, mean_vision_tokens, prefill
from prune.fastv import fastv_schedule, fastv_schedule_for_budget
from rto.errors import UserError


@pytest.fixture(scope="module")
def tiny():
    model, processor = image_model.tiny_random_vlm(seed=2, n_layers=4)
    return model, task.encode(processor, task.make_examples(3, seed=5))


def test_fastv_keeps_the_tokens_that_receive_most_attention(tiny):
    model, inputs = tiny
    k, layer = 12, 1
    _, _, trace = prefill(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], {layer: k}, "fastv"
    )
    eager, _ = image_model.tiny_random_vlm(seed=2, n_layers=4, attn_implementation="eager")
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        attn = eager(**inputs, position_ids=positions, output_attentions=True).attentions[layer]
    for b in range(attn.shape[0]):
        valid = inputs["attention_mask"][b].bool()
        vision = (inputs["input_ids"][b] == model.config.image_token_id).nonzero()[:, 0]
        received = attn[b][:, valid][:, :, vision].mean(dim=(0, 1))  # heads, then every real query token
        assert set(trace.kept_vision[layer][b].tolist()) == set(received.topk(k).indices.tolist())


def test_fastv_schedules():
    assert fastv_schedule(576, k=2, ratio=0.5) == {1: 288}
    schedule = fastv_schedule_for_budget(32, 576, 144, k=2)
    assert mean_vision_tokens(schedule, 32, 576) == pytest.approx(144, abs=0.5)
    with pytest.raises(UserError):
        fastv_schedule_for_budget(12, 64, 8, k=2)
    with pytest.raises(UserError):
        fastv_schedule(576, k=0)


def test_random_baseline_is_seeded_and_needs_no_attention(tiny):
    model, inputs = tiny
    runs = [
        prefill(
            model,
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs["attention_mask"],
            {0: 16},
            "random",
            generator=torch.Generator().manual_seed(9),
        )[2]
        for _ in range(2)
    ]
    assert torch.equal(runs[0].kept_vision[0], runs[1].kept_vision[0])
    assert runs[0].scoring == {}  # no attention rows computed


def test_every_method_generates_with_its_schedule(tiny):
    model, inputs = tiny
    for method in ("adaptinfer", "adaptinfer_no_prior", "fastv", "random"):
        out = generate_pruned(model, inputs, {1: 8}, method, max_new_tokens=3)
        assert out.trace.vision_per_layer == [64, 64, 8, 8]
        assert out.sequences.shape[0] == 3
