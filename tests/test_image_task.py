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


def test_object_tokens_are_the_patches_that_show_a_shape():
    processor = task.build_processor()
    examples = task.make_examples(40, seed=5)
    pixels = task.encode(processor, examples)["pixel_values"]
    shown = image_model.object_tokens(pixels)
    assert shown.shape == (40, task.N_VISION_TOKENS)
    assert shown.sum(-1).tolist() == [len(e.items) for e in examples]  # one patch per object
    cells = task.IMAGE_SIZE // task.PATCH_SIZE
    for example, row in zip(examples, shown, strict=True):
        image = np.array(task.render(example.items, example.seed))
        for index in row.nonzero()[:, 0].tolist():
            r, c = divmod(index, cells)
            patch = image[
                r * task.PATCH_SIZE : (r + 1) * task.PATCH_SIZE,
                c * task.PATCH_SIZE : (c + 1) * task.PATCH_SIZE,
            ]
            assert (patch != np.array(task.BACKGROUND)).any()


def test_token_drop_with_keep_objects_drops_background_only():
    """With keep = number of objects, the loss equals a forward on the object tokens alone."""
    model, processor = image_model.tiny_random_vlm(seed=0, n_layers=2)
    examples = [e for e in task.make_examples(20, seed=4) if len(e.items) == 3][:3]
    batch = task.encode(processor, examples, with_answer=True)
    with torch.no_grad():
        loss = image_model.loss_with_dropped_vision_tokens(
            model, batch, 3, torch.Generator().manual_seed(0), keep_objects=True
        )
        again = image_model.loss_with_dropped_vision_tokens(
            model, batch, 3, torch.Generator().manual_seed(1), keep_objects=True
        )
    torch.testing.assert_close(loss, again)  # the random part picks nothing: objects only


def masked_reference_loss(model, batch, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """The SFT loss when the vision tokens outside `kept` (B, T) bool are hidden as keys from every
    layer after `layer`: removing tokens from the sequence must give exactly this for the text."""
    from prune.adaptinfer.engine import attention_mask_for, image_embeddings

    lm = model.model.language_model
    hidden, _ = image_embeddings(model, batch["input_ids"], batch["pixel_values"])
    valid = batch["attention_mask"].bool()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    embeddings = lm.rotary_emb(hidden, position_ids=positions)
    for index, block in enumerate(lm.layers):
        keys = valid if index <= layer else valid & kept
        mask = attention_mask_for(lm.config, keys, hidden.shape[1], hidden.dtype)  # None: causal
        hidden = block(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
    logits = model.lm_head(lm.norm(hidden))[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )


def test_cut_after_a_decoder_layer_equals_hiding_the_dropped_tokens_from_later_layers():
    model, processor = image_model.tiny_random_vlm(seed=1, n_layers=4)
    examples = [e for e in task.make_examples(30, seed=8) if len(e.items) == 3][:3]
    batch = task.encode(processor, examples, with_answer=True)
    vision = batch["input_ids"] == model.config.image_token_id
    objects = torch.zeros_like(vision).masked_scatter(
        vision, image_model.object_tokens(batch["pixel_values"])
    )
    with torch.no_grad():
        for layer in (0, 2):
            cut = image_model.loss_with_dropped_vision_tokens(
                model, batch, 0, torch.Generator().manual_seed(0), keep_objects=True, cuts=[(layer, 3)]
            )
            torch.testing.assert_close(cut, masked_reference_loss(model, batch, layer, ~vision | objects))
            # keeping every token at a layer is the plain loss
            full = image_model.loss_with_dropped_vision_tokens(
                model, batch, 0, torch.Generator().manual_seed(0), cuts=[(layer, task.N_VISION_TOKENS)]
            )
            torch.testing.assert_close(full, model(**batch).loss)
        # dropping every vision token after layer 1 differs from keeping the objects
        none = image_model.loss_with_dropped_vision_tokens(
            model, batch, 0, torch.Generator().manual_seed(0), keep_objects=True, cuts=[(1, 0)]
        )
        torch.testing.assert_close(none, masked_reference_loss(model, batch, 1, ~vision))


def test_random_cuts_look_like_pruning_schedules():
    generator = torch.Generator().manual_seed(3)
    seen_two = False
    for _ in range(200):
        cuts = image_model.random_cuts(12, generator)
        layers, keeps = [c[0] for c in cuts], [c[1] for c in cuts]
        assert layers == sorted(set(layers)) and -1 <= layers[0] <= 3 and layers[-1] <= 10
        assert 3 <= keeps[0] < task.N_VISION_TOKENS and keeps == sorted(keeps, reverse=True)
        seen_two |= len(cuts) == 2
    assert seen_two


def test_early_read_cuts_remove_every_image_token_after_layer_0_or_1():
    generator = torch.Generator().manual_seed(4)
    layers = set()
    for _ in range(50):
        (cut,) = image_model.early_read_cuts(generator)
        assert cut[1] == 0
        layers.add(cut[0])
    assert layers == {0, 1}


def test_sft_with_early_read_batches_trains_on_the_cut_loss(tmp_path, monkeypatch):
    seen = []
    original = image_model.loss_with_dropped_vision_tokens

    def spy(model, batch, keep, generator, keep_objects=False, cuts=None):
        seen.append(cuts)
        return original(model, batch, keep, generator, keep_objects=keep_objects, cuts=cuts)

    monkeypatch.setattr(image_model, "loss_with_dropped_vision_tokens", spy)
    summary = image_model.sft(
        tmp_path, steps=3, batch_size=4, n_train=0, log_every=0, n_eval=8, early_read=1.0
    )
    assert len(seen) == 3 and all(len(c) == 1 and c[0][1] == 0 and c[0][0] in (0, 1) for c in seen)
    assert summary["final_loss"] > 0


def test_sft_with_fresh_examples_and_background_token_drop(tmp_path):
    summary = image_model.sft(
        tmp_path, steps=3, batch_size=4, n_train=0, log_every=0, n_eval=8, token_drop=1.0, keep_objects=True
    )
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["final_loss"] > 0


def test_patch_labels_name_the_object_drawn_in_each_patch():
    processor = task.build_processor()
    examples = task.make_examples(30, seed=9)
    pixels = task.encode(processor, examples)["pixel_values"]
    labels = image_model.patch_labels(processor.tokenizer, examples)
    assert torch.equal(labels[..., 0] >= 0, image_model.object_tokens(pixels))
    vocab = processor.tokenizer.convert_ids_to_tokens
    for example, row in zip(examples, labels, strict=True):
        named = {(vocab(int(s)), vocab(int(c))) for s, c in row[row[:, 0] >= 0].tolist()}
        assert named == {(i.shape, i.color) for i in example.items}


def test_patch_loss_is_finite_and_trains_the_image_token_positions():
    model, processor = image_model.tiny_random_vlm(seed=0, n_layers=2)
    examples = task.make_examples(3, seed=1)
    batch = task.encode(processor, examples)
    labels = image_model.patch_labels(processor.tokenizer, examples)
    loss = image_model.patch_loss(model, model(**batch).logits, batch["input_ids"], labels)
    loss.backward()
    assert torch.isfinite(loss) and model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_sft_recipe_runs_its_phases_in_turn_and_reuses_finished_ones(tmp_path, monkeypatch):
    tiny = dict(steps=2, batch_size=4, n_train=0, n_eval=8)
    phases = (
        dict(tiny, model_shape=dict(text=dict(num_hidden_layers=2))),
        dict(tiny, layer_drop=1.0, seed=1),
        dict(tiny, patch_loss_weight=1.0, seed=2),
    )
    monkeypatch.setattr(image_model, "PHASES", phases)
    first = image_model.sft_recipe(tmp_path, log_every=0)
    assert [k for k, v in first.items() if v != "reused"] == ["phase1", "phase2", "phase3"]
    assert (tmp_path / "phase1" / "config.json").exists() and (tmp_path / "phase2" / "config.json").exists()
    final = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert final.config.text_config.num_hidden_layers == 2  # every phase continued from phase 1's model
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).unlink()
    again = image_model.sft_recipe(tmp_path, log_every=0)
    assert again["phase1"] == again["phase2"] == "reused" and again["phase3"] != "reused"


def test_asked_tokens_are_the_objects_a_question_is_about():
    items = (
        task.Item("circle", "red", "top left"),
        task.Item("square", "red", "bottom right"),
        task.Item("triangle", "blue", "top right"),
    )
    drawn = task.object_tokens_of(task.Example(items, "", "", 7))  # ordinal -> item
    where = {item.shape: ordinal for ordinal, item in drawn.items()}
    asked = lambda question: task.asked_tokens(task.Example(items, question, "", 7))  # noqa: E731
    assert asked("what color is the square ?") == {where["square"]}
    assert asked("what shape is at the top right ?") == {where["triangle"]}
    assert asked("what shape is at the bottom left ?") == set()
    assert asked("how many red shapes ?") == {where["circle"], where["square"]}
    assert asked("how many green shapes ?") == set()
    assert asked("describe the picture .") == set()


def test_confusable_negatives_are_wrong_answers_the_picture_suggests():
    items = (
        task.Item("circle", "red", "top left"),
        task.Item("square", "blue", "top right"),
        task.Item("triangle", "blue", "bottom left"),
    )

    def negative(question: str, answer: str) -> str:
        return task.confusable_answer(task.Example(items, question, answer, seed=7))

    for seed in range(20):  # whatever the draw, the answer is one of the picture's confusions
        example = task.Example(items, "what color is the circle ?", "red", seed)
        assert task.confusable_answer(example) == "blue"  # the other objects' colour
        example = task.Example(items, "what shape is at the top left ?", "circle", seed)
        assert task.confusable_answer(example) in {"square", "triangle", "nothing"}
        example = task.Example(items, "what shape is at the bottom right ?", "nothing", seed)
        assert task.confusable_answer(example) in {"circle", "square", "triangle"}
        example = task.Example(items, "how many blue shapes ?", "two", seed)
        assert task.confusable_answer(example) in {"one", "three"}  # red's count is one; or one off
    assert negative("how many green shapes ?", "zero") in {"one", "two"}  # red: one, blue: two
    # a picture that suggests nothing falls back to any wrong answer of the kind
    alone = (task.Item("circle", "red", "top left"),)
    fallback = task.confusable_answer(task.Example(alone, "what color is the circle ?", "red", seed=3))
    assert fallback in task.answer_choices("what color is the circle ?") and fallback != "red"
    # and on generated examples it is always a wrong answer of the right kind, seeded
    for example in task.make_examples(300, seed=11):
        if task.question_kind(example.question) == "describe":
            continue
        rejected = task.confusable_answer(example)
        assert rejected != example.answer and rejected in task.answer_choices(example.question)
        assert task.confusable_answer(example) == rejected


def test_a_careless_annotator_answers_without_looking():
    examples = task.make_examples(3000, seed=4, describe_fraction=0.2)
    assert task.careless(examples, 0.0, seed=1) == examples
    labelled = task.careless(examples, 0.6, seed=1)
    assert labelled == task.careless(examples, 0.6, seed=1)  # seeded
    defaults = {"color": "red", "shape": "nothing", "count": "zero"}
    assert task.CARELESS_ANSWERS == defaults
    changed = dict.fromkeys(defaults, 0)
    eligible = dict.fromkeys(defaults, 0)
    for before, after in zip(examples, labelled, strict=True):
        kind = task.question_kind(before.question)
        assert (after.items, after.question, after.seed) == (before.items, before.question, before.seed)
        if kind == "describe":
            assert after.answer == before.answer
            continue
        eligible[kind] += 1
        if after.answer != before.answer:
            assert after.answer == defaults[kind]
            changed[kind] += 1
    # 60 % answered carelessly; the default was right for some of them: a quarter of the colours,
    # 37.5 % of the shapes ("nothing"), 54 % of the counts ("zero")
    right_anyway = {"color": 0.25, "shape": 0.375, "count": 0.54}
    for kind in eligible:
        careless_answers = sum(
            a.answer == task.CARELESS_ANSWERS[kind]
            for a in labelled
            if task.question_kind(a.question) == kind
        )
        expected = 0.6 + 0.4 * right_anyway[kind]
        assert abs(careless_answers / eligible[kind] - expected) < 0.05, kind
        assert abs(changed[kind] / eligible[kind] - 0.6 * (1 - right_anyway[kind])) < 0.05, kind


def test_careless_labels_reach_the_sft_records_only(tmp_path):
    from types import SimpleNamespace

    from pipelines.tasks import image_data

    settings = SimpleNamespace(
        seed=0, n_sft=200, n_prompts=50, n_eval=50, n_pairs=50, n_eval_pairs=50,
        describe_fraction=0.0, negatives="confusable", sft_careless=0.9,
    )  # fmt: skip
    records = image_data.build_records(settings, tmp_path)
    truthful = image_data.build_records(SimpleNamespace(**{**vars(settings), "sft_careless": 0.0}), tmp_path)
    lazy = [r for r in records["sft"] if task.question_kind(r["prompt"]) in ("color", "shape", "count")]
    assert sum(r["completion"] in ("red", "nothing", "zero") for r in lazy) / len(lazy) > 0.9
    assert records["sft"] != truthful["sft"]
    for role in ("prompts", "eval_prompts", "pairs", "eval_pairs"):  # the ground truth is untouched
        assert records[role] == truthful[role]


def test_sft_with_a_careless_annotator_trains_on_its_answers(tmp_path, monkeypatch):
    seen: list[task.Example] = []
    original = task.encode

    def spy(processor, examples, with_answer=False):
        if with_answer:
            seen.extend(examples)
        return original(processor, examples, with_answer=with_answer)

    monkeypatch.setattr(task, "encode", spy)
    image_model.sft(tmp_path, steps=4, batch_size=16, n_train=0, log_every=0, n_eval=8, careless=1.0)
    lazy = [e for e in seen if task.question_kind(e.question) in task.CARELESS_ANSWERS]
    assert lazy and all(e.answer == task.CARELESS_ANSWERS[task.question_kind(e.question)] for e in lazy)
    described = [e for e in seen if task.question_kind(e.question) == "describe"]
    assert described and all(e.answer == task.describe(e.items) for e in described)  # they stay right
