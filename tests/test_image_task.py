"""The built-in image task: data, ground truth, tokenizer/processor files, model files, SFT."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipelines.tasks import image as task
from pipelines.tasks import image_model


def test_examples_are_deterministic_and_answers_are_right():
    a, b = task.make_examples(50, seed=1), task.make_examples(50, seed=1)
    assert a == b
    for example in a:
        kind = example.question.split()[0:2]
        if kind == ["what", "color"]:
            shape = example.question.split()[4]
            assert example.answer == next(i.color for i in example.items if i.shape == shape)
        elif kind == ["how", "many"]:
            color = example.question.split()[2]
            assert example.answer == task.COUNTS[sum(i.color == color for i in example.items)]
        else:
            position = " ".join(example.question.split()[5:7])
            assert example.answer in [i.shape for i in example.items if i.position == position] + ["nothing"]


def test_pictures_show_the_items():
    item = task.Item("square", "red", "bottom right")
    image = task.render((item,), seed=0)
    pixels = torch.from_numpy(np.array(image))
    red = (pixels == torch.tensor(task.COLORS["red"])).all(-1)
    assert red[16:, 16:].sum() == 12 and red.sum() == 12  # a hollow 4x4 square


def test_reward():
    assert task.reward("red </s>", "red") == 1.0
    assert task.reward("red", "red") == 1.0
    assert task.reward("red red </s>", "red") == 0.0
    assert task.reward("blue </s>", "red") == 0.0
    assert task.reward("", "red") == 0.0


def test_processor_and_model_round_trip_through_hf_files(tmp_path):
    model, processor = image_model.tiny_random_vlm(seed=0, n_layers=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    examples = task.make_examples(3, seed=0)
    inputs, again = task.encode(processor, examples), task.encode(loaded, examples)
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    assert torch.equal(inputs["pixel_values"], again["pixel_values"])
    assert (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist() == [task.N_VISION_TOKENS] * 3
    assert (
        loaded.tokenizer.decode(loaded.tokenizer("what color is the circle ?")["input_ids"])
        == "what color is the circle ?"
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits)


def test_sft_runs_saves_and_evaluates(tmp_path):
    summary = image_model.sft(tmp_path, steps=3, batch_size=4, n_train=16, log_every=0, n_eval=8)
    assert (tmp_path / "config.json").exists() and (tmp_path / "processor_config.json").exists()
    assert 0.0 <= summary["accuracy"] <= 1.0


def test_token_drop_loss_with_every_token_kept_is_the_plain_loss():
    model, processor = image_model.tiny_random_vlm(seed=0, n_layers=2)
    batch = task.encode(processor, task.make_examples(3, seed=2, describe_fraction=0.5), with_answer=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = image_model.loss_with_dropped_vision_tokens(model, batch, task.N_VISION_TOKENS, generator)
        torch.testing.assert_close(full, model(**batch).loss)
        assert torch.isfinite(image_model.loss_with_dropped_vision_tokens(model, batch, 5, generator))
