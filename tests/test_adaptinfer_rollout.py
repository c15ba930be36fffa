"""AdaptInfer as a rollout worker's generate function, the VLM scoring path PPO uses, and the
image-task pieces of the pipeline (collator, records, ground-truth sentence reward)."""

from __future__ import annotations

import pytest
import torch

from pipelines.tasks import image, image_data, image_model
from prune.adaptinfer.rollout import AdaptInferGenerate, vision_shape
from rto.distributed.rollout import RolloutWorker
from rto.forward import response_logprobs
from rto.generation import left_pad


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    model, processor = image_model.tiny_random_vlm(seed=3)
    folder = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def prompt_batch(processor, n: int = 6, seed: int = 0) -> dict:
    examples = image.make_examples(n, seed)
    records = [{"prompt": e.question, "image": None, "answer": e.answer} for e in examples]
    pictures = [image.render(e.items, e.seed) for e in examples]
    encoded = []
    for record, picture in zip(records, pictures, strict=True):
        out = processor(images=[picture], text=[image.prompt_text(record["prompt"])], return_tensors="pt")
        encoded.append((out["input_ids"][0].tolist(), out["pixel_values"][0]))
    ids, mask = left_pad([e[0] for e in encoded], processor.tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack([e[1] for e in encoded])}


def test_keep_all_rollouts_equal_dense_generation(vlm_dir):
    """With a keep-all schedule the pruned sampler is the dense policy: same tokens, same log-probs."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm_dir)
    batch = prompt_batch(processor)
    dense = RolloutWorker(str(vlm_dir), max_new_tokens=5, temperature=0)
    pruned = RolloutWorker(str(vlm_dir), AdaptInferGenerate({}), max_new_tokens=5, temperature=0)
    a, b = dense.generate(batch), pruned.generate(batch)
    assert torch.equal(a["sequences"], b["sequences"])
    assert torch.equal(a["response_mask"], b["response_mask"])
    torch.testing.assert_close(a["sampler_logprobs"], b["sampler_logprobs"], atol=1e-5, rtol=0)


def test_pruned_rollouts_are_rescored_densely(vlm_dir):
    """Sampler log-probs of a pruned rollout are its own; the dense re-score (what PPO trains on) is
    the policy's log-prob of the same tokens with the whole picture; they differ, IS corrects it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm_dir)
    batch = prompt_batch(processor, n=8)
    worker = RolloutWorker(str(vlm_dir), AdaptInferGenerate({0: 8, 2: 2}), max_new_tokens=4, temperature=1.0)
    torch.manual_seed(0)
    out = worker.generate(batch)
    mask = out["response_mask"].bool()
    prompt_len = batch["input_ids"].shape[1]
    dense = response_logprobs(
        worker.model, out["sequences"], out["attention_mask"], prompt_len, pixel_values=batch["pixel_values"]
    )
    assert mask.any() and bool((dense[~mask] == 0).all())
    assert not torch.allclose(dense[mask], out["sampler_logprobs"][mask], atol=1e-3)
    # ... and equal to a plain transformers forward of the dense model on those tokens
    from prune.adaptinfer import vlm_token_logprobs

    reference = vlm_token_logprobs(
        worker.model, out["sequences"], batch["pixel_values"], out["attention_mask"]
    )[:, prompt_len - 1 :]
    torch.testing.assert_close(dense[mask], reference[mask], atol=1e-5, rtol=0)

    # dense=True (the sampler-KL guard's fallback step): the same worker samples with the dense policy,
    # whose own log-probs are then the dense re-score's
    torch.manual_seed(0)
    fallback = worker.generate(batch, dense=True)
    kept = fallback["response_mask"].bool()
    rescored = response_logprobs(
        worker.model, fallback["sequences"], fallback["attention_mask"], prompt_len,
        pixel_values=batch["pixel_values"],
    )  # fmt: skip
    assert kept.any()
    torch.testing.assert_close(fallback["sampler_logprobs"][kept], rescored[kept], atol=1e-4, rtol=0)


def test_rollouts_never_emit_the_image_token(vlm_dir):
    """Even a policy that prefers its image placeholder never samples it (scorers would then look
    for a picture it has not got)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm_dir)
    batch = prompt_batch(processor, n=4)
    for fn in (None, AdaptInferGenerate({0: 16})):
        worker = RolloutWorker(str(vlm_dir), **({"generate_fn": fn} if fn else {}), max_new_tokens=4)
        image_token = worker.model.config.image_token_id
        with torch.no_grad():
            worker.model.lm_head.weight[image_token] *= 50.0  # tied: embeddings too; still a valid model
        torch.manual_seed(0)
        out = worker.generate(batch)
        assert not bool((out["sequences"][:, batch["input_ids"].shape[1] :] == image_token).any())
        assert bool(torch.isfinite(out["sampler_logprobs"]).all())


def test_vision_shape_and_missing_tower(vlm_dir):
    from transformers import AutoConfig, LlamaConfig

    from rto.errors import UserError

    assert vision_shape(AutoConfig.from_pretrained(vlm_dir)) == (4, image.N_VISION_TOKENS)
    with pytest.raises(UserError, match="no vision tower"):
        vision_shape(LlamaConfig())


def test_sft_collator_supervises_only_the_answer(tmp_path):
    processor = image.build_processor()
    picture = image.render((image.Item("square", "blue", "top right"),), 1)
    picture.save(tmp_path / "p.png")
    rows = [
        {"prompt": "what color is the square ?", "completion": "blue", "image": "p.png"},
        {"prompt": "describe the picture .", "completion": "blue square top right", "image": "p.png"},
    ]
    batch = image_data.SFTCollator(processor, tmp_path)(rows)
    tokenizer = processor.tokenizer
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        supervised = ids[labels != -100].tolist()
        assert tokenizer.convert_ids_to_tokens(supervised) == [*row["completion"].split(), "</s>"]
        assert (
            int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == image.N_VISION_TOKENS
        )
    assert batch["pixel_values"].shape == (2, 3, image.IMAGE_SIZE, image.IMAGE_SIZE)


def test_image_records_round_trip(tmp_path):
    from rto.config import ImageTaskConfig

    settings = ImageTaskConfig(n_sft=6, n_prompts=4, n_eval=3, n_pairs=5, n_eval_pairs=2, seed=5)
    records = image_data.build_records(settings, tmp_path)
    sizes = {"sft": 6, "prompts": 4, "eval_prompts": 3, "pairs": 5, "eval_pairs": 2}
    assert {k: len(v) for k, v in records.items()} == sizes
    record = records["prompts"][0]
    assert image_data.load_image(record["image"], tmp_path).size == (image.IMAGE_SIZE, image.IMAGE_SIZE)
    assert image_data.record_reward(record, record["answer"]) == 1.0
    assert image_data.record_reward(record, f"{record['answer']} {record['answer']}") == 0.0
    assert image_data.prompt_label(record).startswith("[prompts-000000.png] ")


def test_ground_truth_sentence_reward_is_added_unnormalised():
    from reward.compose import compose_token_rewards
    from reward.config import RewardConfig

    config = RewardConfig(mode="ppo", sentence_reward="ground_truth", beta2=0.1)
    assert not config.needs_rm and config.uses_sentence_score
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    rewards = compose_token_rewards(
        config, response_mask=mask, logprobs=logprobs, ref_logprobs=ref, rm_scores=torch.tensor([1.0, 0.0])
    )
    expected = -0.1 * (logprobs - ref) * mask + torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards.reward, expected)


def test_rollout_worker_reads_a_vlms_token_ids_from_its_text_config(tmp_path):
    """A Llava config keeps eos/pad in its text config; a generation config without them is fine."""
    model, processor = image_model.tiny_random_vlm(seed=1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    worker = RolloutWorker(str(tmp_path), AdaptInferGenerate({0: 8}), max_new_tokens=2)
    assert worker.eos_token_ids == [processor.tokenizer.eos_token_id]
    assert worker.pad_token_id == processor.tokenizer.pad_token_id


def test_external_image_data_is_pinned_at_prepare_time(tmp_path, monkeypatch):
    """Pictures given as bytes (a Hub `Image` column, Parquet) are written beside the prepared data;
    relative paths are resolved against the data file's folder, whatever the working directory."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.prepare import prepare
    from rto.config import config_from_dict
    from rto.rundir import RunDir

    picture = image.render((image.Item("circle", "green", "bottom left"),), 2)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    pq.write_table(
        pa.table(
            {
                "prompt": ["what color is the circle ?"],
                "image": [{"bytes": buffer.getvalue(), "path": None}],
                "answer": ["green"],
            }
        ),
        tmp_path / "prompts.parquet",
    )
    (tmp_path / "data").mkdir()
    picture.save(tmp_path / "data" / "p.png")
    (tmp_path / "data" / "eval.jsonl").write_text(
        '{"prompt": "what color is the circle ?", "image": "p.png", "answer": "green"}\n'
    )
    cfg = config_from_dict(
        {
            "stages": ["sft", "ppo", "eval"],
            "task": {"name": "image", "n_sft": 4, "n_prompts": 2, "n_eval": 2},
            "policy": {"builtin": "tiny-llava", "arch": {"num_hidden_layers": 2}},
            "data": {
                "prompts": {"path": str(tmp_path / "prompts.parquet")},
                "eval_prompts": {"path": str(tmp_path / "data" / "eval.jsonl")},
            },
        }
    )
    prepared = prepare(cfg, RunDir(tmp_path / "run").create(), log=lambda *_: None)
    monkeypatch.chdir(tmp_path / "run")  # somewhere else than the data
    for role in ("prompts", "eval_prompts"):
        (record,) = prepared.records(role)
        loaded = image_data.load_image(record["image"], prepared.root)
        assert loaded.tobytes() == picture.convert("RGB").tobytes()


def test_external_image_prompts_need_answers_and_pairs_their_question(tmp_path):
    from pipelines.prepare import prepare
    from rto.config import config_from_dict
    from rto.errors import UserError
    from rto.rundir import RunDir

    image.render((image.Item("circle", "red", "top left"),), 0).save(tmp_path / "p.png")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "what color is the circle ?", "image": "p.png"}\n')
    cfg = config_from_dict(
        {
            "stages": ["sft", "ppo"],
            "task": {"name": "image", "n_sft": 4, "n_prompts": 2, "n_eval": 2},
            "policy": {"builtin": "tiny-llava", "arch": {"num_hidden_layers": 2}},
            "data": {"prompts": {"path": str(tmp_path / "prompts.jsonl")}},
        }
    )
    with pytest.raises(UserError, match=r"prompts.jsonl: data.prompts.path: row 1 has no 'answer'"):
        prepare(cfg, RunDir(tmp_path / "run").create(), log=lambda *_: None)
    # image preference pairs need the question they answer
    (tmp_path / "pairs.jsonl").write_text('{"chosen": "red", "rejected": "blue", "image": "p.png"}\n')
    cfg = config_from_dict(
        {
            "stages": ["sft", "dpo"],
            "task": {
                "name": "image",
                "n_sft": 4,
                "n_prompts": 2,
                "n_eval": 2,
                "n_pairs": 2,
                "n_eval_pairs": 2,
            },
            "policy": {"builtin": "tiny-llava", "arch": {"num_hidden_layers": 2}},
            "data": {"pairs": {"path": str(tmp_path / "pairs.jsonl")}},
        }
    )
    with pytest.raises(UserError, match=r"pairs.jsonl: data.pairs.path: row 1 has no 'prompt'"):
        prepare(cfg, RunDir(tmp_path / "run2").create(), log=lambda *_: None)


def test_random_baseline_rollouts_follow_the_step_seed():
    """The random scorer's choice derives from the step's seed (what `reseed` sets), so a resumed
    run repeats an uninterrupted one; another step prunes differently."""
    model, processor = image_model.tiny_random_vlm(seed=2)
    examples = image.make_examples(8, 0)
    batch = image.encode(processor, examples)
    sampler = AdaptInferGenerate({0: 4}, "random")

    def kept(step_seed: int) -> torch.Tensor:
        from prune.adaptinfer import prefill

        torch.manual_seed(step_seed)
        generator = torch.Generator().manual_seed(sampler.seed + torch.initial_seed())
        _, _, trace = prefill(
            model,
            batch["input_ids"],
            batch["pixel_values"],
            batch["attention_mask"],
            {0: 4},
            "random",
            generator,
        )
        return trace.kept_vision[0]

    def rollout(step_seed: int) -> torch.Tensor:
        torch.manual_seed(step_seed)
        ids, _ = sampler(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=3,
                         pixel_values=batch["pixel_values"])  # fmt: skip
        return ids

    assert torch.equal(rollout(11), rollout(11))
    assert not torch.equal(kept(11), kept(12))


def test_keep_all_sampler_logprobs_are_the_policys_at_the_sampling_temperature(vlm_dir):
    """At temperature 0.7 with top-p 0.9, AdaptInfer reports its log-probs as every sampler does
    (log softmax(logits / T), before truncation and suppression): with nothing pruned, exactly
    the dense policy's log-probs at T, which is how PPO scores the policy."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm_dir)
    batch = prompt_batch(processor, n=8)
    worker = RolloutWorker(str(vlm_dir), AdaptInferGenerate({}), max_new_tokens=6, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    out = worker.generate(batch)
    mask = out["response_mask"].bool()
    dense = response_logprobs(
        worker.model, out["sequences"], out["attention_mask"], batch["input_ids"].shape[1],
        pixel_values=batch["pixel_values"], temperature=0.7,
    )  # fmt: skip
    torch.testing.assert_close(out["sampler_logprobs"][mask], dense[mask], atol=1e-4, rtol=0)


def test_vlm_rollouts_never_emit_any_special_token_but_eos(vlm_dir):
    from transformers import AutoProcessor

    from rto.models import model_sampling_token_ids

    processor = AutoProcessor.from_pretrained(vlm_dir)
    batch = prompt_batch(processor, n=8)
    never = model_sampling_token_ids(str(vlm_dir))["suppress_token_ids"]
    assert processor.tokenizer.pad_token_id in never
    for fn in (None, AdaptInferGenerate({0: 16})):
        worker = RolloutWorker(str(vlm_dir), **({"generate_fn": fn} if fn else {}), max_new_tokens=6)
        with torch.no_grad():  # the fault: every forbidden token far more likely than any other
            head = worker.model.lm_head
            head.register_forward_hook(lambda _m, _i, logits: logits.index_add(
                -1, torch.tensor(never), torch.full((*logits.shape[:-1], len(never)), 30.0)
            ))  # fmt: skip
        torch.manual_seed(0)
        out = worker.generate(batch)
        emitted = out["sequences"][:, batch["input_ids"].shape[1] :][out["response_mask"].bool()]
        assert emitted.numel() > 20 and not torch.isin(emitted, torch.tensor(never)).any()
