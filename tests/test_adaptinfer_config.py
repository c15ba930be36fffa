"""AdaptInfer config, schedules and bad input: every mistake is a one-line `UserError`."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipelines.tasks import image as task
from pipelines.tasks import image_model
from prune.adaptinfer import (
    PRESETS,
    AdaptInferConfig,
    generate_pruned,
    mean_vision_tokens,
    proportional_schedule,
)
from rto.errors import UserError


@pytest.fixture(scope="module")
def tiny():
    model, processor = image_model.tiny_random_vlm(seed=1, n_layers=4)
    return model, processor, task.encode(processor, task.make_examples(2, seed=3))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_schedule_keeping_more_tokens_than_exist(tiny):
    model, _, inputs = tiny
    with pytest.raises(UserError) as error:
        generate_pruned(model, inputs, {1: 65}, max_new_tokens=1)
    assert "layer 1 keeps 65 vision tokens but only 64 exist" in one_line(error)
    with pytest.raises(UserError) as error:
        generate_pruned(model, inputs, {0: 10, 2: 20}, max_new_tokens=1)
    assert "layer 2 keeps 20" in one_line(error) and "only 10 exist" in one_line(error)


def test_schedule_naming_a_missing_layer(tiny):
    model, _, inputs = tiny
    with pytest.raises(UserError) as error:
        generate_pruned(model, inputs, {4: 8}, max_new_tokens=1)
    assert "layer 4 does not exist (the model has layers 0..3)" in one_line(error)


def test_preset_too_deep_for_the_model_names_the_preset():
    with pytest.raises(UserError) as error:
        AdaptInferConfig(preset="llava-1.5-64").resolve(n_layers=12, n_vision=64)
    assert "preset llava-1.5-64" in one_line(error) and "layer 1 keeps 133" in one_line(error)


def test_model_without_a_vision_tower(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, _, inputs = tiny
    text_only = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UserError) as error:
        generate_pruned(text_only, inputs, {0: 8}, max_new_tokens=1)
    assert "LlamaForCausalLM has no vision tower" in one_line(error)


def test_prompt_without_image_tokens(tiny):
    model, _, inputs = tiny
    broken = dict(
        inputs,
        input_ids=inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 5),
    )
    with pytest.raises(UserError) as error:
        generate_pruned(model, broken, {0: 8}, max_new_tokens=1)
    assert "each prompt needs 64 image tokens" in one_line(error)


def test_undecodable_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(UserError) as error:
        task.decode_image(path)
    assert str(path) in one_line(error) and "cannot decode image" in one_line(error)
    with pytest.raises(UserError, match="row 3: cannot decode image"):
        task.decode_image(b"garbage", source="row 3")
    assert task.decode_image(_png(tmp_path)).size == (32, 32)


def _png(tmp_path):
    path = tmp_path / "ok.png"
    task.render(task.make_examples(1, 0)[0].items, 0).save(path)
    return path


def test_config_validation():
    assert AdaptInferConfig(preset="llava-1.5-64").resolve(32, 576) == {1: 133, 10: 27, 20: 3}
    assert AdaptInferConfig(schedule={3: 10, 1: 20}).schedule == {1: 20, 3: 10}
    assert AdaptInferConfig(enabled=False).resolve(32, 576) == {}
    for bad in (
        dict(),
        dict(preset="llava-1.5-64", keep_ratio=0.5),
        dict(preset="nope"),
        dict(schedule={1: 5, 2: 9}),
        dict(keep_ratio=0.0),
        dict(keep_ratio=0.5, color="red"),
        dict(keep_ratio=0.5, method="sparsevlm"),
    ):
        with pytest.raises(ValidationError):
            AdaptInferConfig(**bad)


def test_presets_and_proportional_schedules():
    # the paper's budget count: (576 + 9 k1 + 10 k2 + 12 k3) / 32; strict count with two full layers
    for name, budget in (("llava-1.5-128", 128), ("llava-1.5-64", 64), ("llava-1.5-192", 192)):
        k1, k2, k3 = PRESETS[name].values()
        assert abs((576 + 9 * k1 + 10 * k2 + 12 * k3) / 32 - budget) < 1.0
    assert mean_vision_tokens(PRESETS["llava-1.5-64"], 32, 576) == pytest.approx(82.875)
    for ratio in (0.5, 0.25, 0.125):
        schedule = proportional_schedule(12, 64, ratio * 64)
        assert list(schedule) == [0, 4, 8]
        assert mean_vision_tokens(schedule, 12, 64) == pytest.approx(ratio * 64, abs=0.6)
    assert list(proportional_schedule(32, 576, 72)) == [1, 10, 20]
    with pytest.raises(UserError, match="below"):
        proportional_schedule(32, 576, 20)


def test_config_resolves_a_keep_ratio_against_the_model():
    schedule = AdaptInferConfig(keep_ratio=0.25).resolve(n_layers=12, n_vision=64)
    assert mean_vision_tokens(schedule, 12, 64) == pytest.approx(16, abs=0.6)
    assert torch.tensor(list(schedule.values())).diff().le(0).all()
