"""The image task through the staged pipeline: SFT and DPO of a tiny VLM with TRL, PPO with RTO's
token reward whose rollout workers generate with AdaptInfer pruning (pictures carried through
rollout, scorers and losses), and the evaluation of dense and pruned policies; plus the bad inputs
of issue 6."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from pipeline_helpers import rto, write_job

TINY_VLM_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
}

IMAGE_JOB = {
    "seed": 0,
    "device": "cpu",
    "stages": ["sft", "dpo", "ppo", "eval"],
    "task": {"name": "image", "n_sft": 256, "n_prompts": 32, "n_eval": 16, "n_pairs": 64, "n_eval_pairs": 16},
    "policy": {"builtin": "tiny-llava", "arch": TINY_VLM_ARCH},
    "sft": {"max_steps": 12, "batch_size": 16, "lr": 3e-3},
    "dpo": {"max_steps": 6, "batch_size": 8, "lr": 3e-3},
    "ppo": {
        "steps": 2, "rollout_batch_size": 8, "train_batch_size": 8, "micro_batch_size": 8,
        "max_new_tokens": 4, "checkpoint_every": 1, "rollout_pruner": "adaptinfer",
        "temperature": 0.7, "top_p": 0.9,  # sampled off the model's own distribution: scored at T
        "entropy_coef": 0.05,  # a gradient even if every rollout's reward is 0 after 12 SFT steps
    },
    "adaptinfer": {"keep_ratio": 0.25},
    "eval": {"max_new_tokens": 4, "batch_size": 16},
    "resources": {"num_cpus": 2},
}  # fmt: skip


def write_image_job(directory: Path, **changes) -> Path:
    return write_job(directory, base=IMAGE_JOB, **changes)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A finished sft → dpo → ppo (RTO, AdaptInfer rollouts) → eval run of the image task."""
    root = tmp_path_factory.mktemp("image")
    result = rto("run", str(write_image_job(root)), "--run-dir", str(root / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_image_job_runs_ppo_with_pruned_rollouts(image_run):
    summary = json.loads((image_run / "summary.json").read_text())
    assert summary["sft"]["steps"] == 12
    assert summary["dpo"]["steps"] == 6 and summary["dpo"]["pairs"] == 64
    # held-out pairs scored by the DPO model against its reference (the SFT model)
    assert 0.0 <= summary["dpo"]["dpo_reward_accuracy"] <= 1.0 and summary["dpo"]["dpo_reward_margin"] != 0.0
    assert summary["ppo"]["reward_mode"] == "rto"
    rows = [json.loads(line) for line in (image_run / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if r["stage"] == "ppo"]
    assert [r["step"] for r in ppo] == [1, 2]
    # the pruned sampler is not the dense policy: PPO weighted its tokens (truncated IS)
    assert all(0 < r["is_weight_mean"] <= 2.0 for r in ppo)
    # before any update the first minibatch's ratio is 1 and no value is clipped (at T = 0.7, top-p 0.9)
    assert all(r["first_minibatch_ratio_error"] < 1e-4 for r in ppo)
    assert all(r["first_minibatch_value_clip_frac"] == 0.0 for r in ppo)
    assert all(0.0 <= r["gt_reward"] <= 1.0 for r in ppo)
    assert ppo[1]["kl"] != 0.0  # the first update moved the policy away from the reference

    table = pq.read_table(image_run / "traces" / "step-000002.parquet").to_pylist()
    assert len(table) == 8
    for row in table:
        assert row["prompt"].startswith("[prompts-") and row["prompt"].endswith("?")
        # the ground truth is the sentence-level reward, added unnormalised at the last token
        assert row["rm_score"] == pytest.approx(row["gt_reward"])
        # RTO: β1·log π_dpo/π_ref per token (pictures included in both scorers' forwards) + KL + score
        ratios = zip(row["dpo_logprob"], row["ref_logprob"], strict=True)
        dpo_term = [min(max(0.05 * (d - r), -0.05), 0.05) for d, r in ratios]  # β1 = c = 0.05
        assert row["reward_dpo"] == pytest.approx(dpo_term, abs=1e-5)
        assert any(abs(d) > 1e-6 for d in row["reward_dpo"])  # the DPO model moved
        total = sum(row["reward_kl"]) + sum(row["reward_dpo"]) + row["rm_score"]
        assert sum(row["reward"]) == pytest.approx(total, abs=1e-5)
        assert "<image>" not in row["tokens"]  # the policy never emits its image placeholder
    # the step's DPO-vs-ground-truth separation is the traces' own (absent when every GT is equal)
    gts = [row["gt_reward"] for row in table]
    sums = [sum(row["reward_dpo"]) for row in table]
    if len(set(gts)) > 1:
        pairs = [(s, t) for s, g in zip(sums, gts) for t, h in zip(sums, gts) if g > h]  # noqa: B905
        auc = sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)
        assert ppo[1]["dpo_gt_auc"] == pytest.approx(auc, abs=1e-6)
    else:
        assert "dpo_gt_auc" not in ppo[1]

    evals = summary["eval"]["policies"]
    assert {"base", "sft", "dpo", "ppo", "sft+adaptinfer", "dpo+adaptinfer", "ppo+adaptinfer"} <= set(evals)
    assert all(evals[name]["samples"] == 16 for name in evals)
    # each accuracy comes with its standard error, from the policy's own samples
    gts = [json.loads(x)["gt_reward"] for x in (image_run / "stages" / "eval" / "samples-sft.jsonl").open()]
    mean = sum(gts) / len(gts)
    se = (sum((g - mean) ** 2 for g in gts) / (len(gts) - 1) / len(gts)) ** 0.5
    assert evals["sft"]["gt_reward"] == pytest.approx(mean) and evals["sft"]["gt_se"] == pytest.approx(se)


def test_image_job_outputs_load_as_plain_transformers(image_run):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from rto.models import load_model

    policy_dir = image_run / "stages" / "ppo" / "policy"
    policy = LlavaForConditionalGeneration.from_pretrained(policy_dir)
    processor = AutoProcessor.from_pretrained(policy_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == policy.config.image_token_id
    critic = load_model(str(image_run / "stages" / "ppo" / "critic"), "token_classification")
    assert critic.lm_head.out_features == 1
    assert bool((critic.lm_head.weight != 0).any())  # the trained value head came back, not a fresh one
    sft = LlavaForConditionalGeneration.from_pretrained(image_run / "stages" / "sft")
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(sft.state_dict().values(), policy.state_dict().values(), strict=True)
    )
    assert changed


def copy_run(image_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(image_run, target)
    return target


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({40: 4}, "layer 40 does not exist"),
        ({0: 100}, "keeps 100 vision tokens but only 64 exist"),
    ],
)
def test_bad_schedule_is_a_config_error_before_ray(image_run, tmp_path, schedule, message):
    run = copy_run(image_run, tmp_path)
    job = write_image_job(tmp_path, adaptinfer={"schedule": schedule}, stages=["sft", "ppo"])
    result = rto("run", str(job), "--run-dir", str(run), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "adaptinfer.schedule" in line and message in line
    assert "Traceback" not in result.stderr


def test_undecodable_image_is_exit_2_naming_file_and_row(tmp_path):
    good = tmp_path / "ok.png"
    from pipelines.tasks import image

    image.render((image.Item("circle", "red", "top left"),), 0).save(good)
    (tmp_path / "broken.png").write_text("not a picture")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "what color is the circle ?", "image": str(good), "answer": "red"})
        + "\n"
        + json.dumps({"prompt": "what color is the circle ?", "image": str(tmp_path / "broken.png")})
        + "\n"
    )
    job = write_image_job(tmp_path, data={"prompts": {"path": str(prompts)}})
    result = rto("run", str(job), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert str(prompts) in line and "row 2" in line and "cannot decode image" in line


def test_policy_without_vision_tower_is_exit_2(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.tasks import image

    tokenizer = image.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "text-model")
    tokenizer.save_pretrained(tmp_path / "text-model")
    job = write_image_job(tmp_path, policy={"path": str(tmp_path / "text-model")}, stages=["sft"])
    result = rto("run", str(job), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "policy.path" in line and "no vision tower" in line


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"stages": ["sft", "rm"]}, "stages"),
        ({"stages": ["sft", "ppo", "eval"], "reward": {"mode": "rto"}}, "reward.mode"),
        ({"ppo": {"rollout_pruner": "ftp"}}, "ppo.rollout_pruner"),
        ({"adaptinfer": {"keep_ratio": 0.25, "preset": "llava-1.5-64"}}, "adaptinfer"),
        ({"policy": {"builtin": "tiny-llama"}}, "policy.builtin"),
        ({"task": {"name": "image", "sft_careless": 1.0}}, "task.sft_careless"),
        ({"task": {"name": "image", "sft_careless": -0.1}}, "task.sft_careless"),
    ],
)
def test_image_job_config_errors_name_the_field(tmp_path, changes, field):
    job = write_image_job(tmp_path, **changes)
    result = rto("validate", str(job), timeout=60)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert f"field '{field}" in line and str(job) in line


def test_text_job_cannot_use_adaptinfer(tmp_path):
    job = write_job(tmp_path, ppo__rollout_pruner="adaptinfer")
    result = rto("validate", str(job), timeout=60)
    assert result.returncode == 2
    assert "field 'ppo.rollout_pruner'" in result.stderr and "vision-language" in result.stderr


def test_score_command_refuses_an_image_run(image_run, tmp_path):
    run = copy_run(image_run, tmp_path)
    result = rto("score", str(write_image_job(tmp_path)), "--run-dir", str(run), timeout=120)
    assert result.returncode == 2
    assert "task.name" in result.stderr and "rto traces" in result.stderr


@pytest.mark.parametrize(
    ("stages", "mode"), [(["sft", "dpo", "ppo", "eval"], "rto"), (["sft", "ppo", "eval"], "ppo")]
)
def test_image_reward_mode_defaults_to_rto_when_there_is_a_dpo_stage(tmp_path, stages, mode):
    from rto.config import load_config

    cfg = load_config(write_image_job(tmp_path, stages=stages))
    assert cfg.reward.mode == mode and cfg.reward.sentence_reward == "ground_truth"


def test_image_preference_pairs_and_their_dpo_rows(tmp_path):
    from pipelines.stages.dpo import image_pair_rows
    from pipelines.tasks import image as task
    from pipelines.tasks.image_data import build_records
    from rto.config import ImageTaskConfig

    settings = ImageTaskConfig(n_sft=2, n_prompts=2, n_eval=2, n_pairs=40, n_eval_pairs=5, seed=3)
    records = build_records(settings, tmp_path)
    pairs = records["pairs"]
    assert len(pairs) == 40 and len(records["eval_pairs"]) == 5
    examples = task.make_examples(40, settings.seed + 4)
    for pair, example in zip(pairs, examples, strict=True):
        assert pair["chosen"] == example.answer != pair["rejected"]
        assert pair["rejected"] in task.answer_choices(example.question)
        assert pair["rejected"] == task.confusable_answer(example)  # task.negatives' default
        assert (tmp_path / pair["image"]).exists()
    assert len({p["rejected"] for p in pairs}) > 3  # wrong answers of every kind, not one fixed word
    assert build_records(settings, tmp_path / "again")["pairs"] == pairs  # deterministic
    uniform = build_records(settings.model_copy(update={"negatives": "random"}), tmp_path / "random")
    assert [p["rejected"] for p in uniform["pairs"]] == [task.wrong_answer(e) for e in examples]
    rows = image_pair_rows(pairs[:2], tmp_path)
    assert rows[0]["prompt"] == task.prompt_text(pairs[0]["prompt"])
    assert rows[0]["chosen"].split() == [pairs[0]["chosen"], task.SPECIAL["eos"]]
    assert rows[0]["images"][0].size == (task.IMAGE_SIZE, task.IMAGE_SIZE)


def test_image_response_logprobs_match_a_plain_forward_of_each_pair(tmp_path):
    """The held-out preference figures' log-likelihoods: batched (left-padded prompts,
    right-padded responses) equal one unpadded forward per pair."""
    from pipelines.stages.dpo import image_response_logprob_sums
    from pipelines.tasks import image as task
    from pipelines.tasks import image_model
    from pipelines.tasks.image_data import build_records, encode_prompt
    from rto.config import ImageTaskConfig

    model, processor = image_model.tiny_random_vlm(seed=2, n_layers=2)
    settings = ImageTaskConfig(n_sft=1, n_prompts=1, n_eval=1, n_pairs=6, n_eval_pairs=1, seed=1)
    pairs = build_records(settings, tmp_path)["pairs"]
    pairs[1] = {**pairs[1], "rejected": "two three"}  # responses of different lengths
    got = image_response_logprob_sums(model, processor, pairs, "rejected", tmp_path, batch_size=4)
    eos = task.SPECIAL["eos"]
    for pair, value in zip(pairs, got, strict=True):
        prompt, pixels = encode_prompt(processor, pair, tmp_path)
        response = processor.tokenizer(f"{pair['rejected']} {eos}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels[None]).logits[0, :-1].float()
        logprobs = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        torch.testing.assert_close(value, logprobs[-len(response) :].sum(), rtol=1e-4, atol=1e-4)


def test_policy_negatives_are_the_policys_most_likely_wrong_answers(tmp_path):
    """`dpo.negatives: policy`: each pair's rejected answer is the wrong answer the policy scores
    highest (answer + EOS after the picture and question); a question outside the task's kinds is a
    one-line error naming the pairs file and the row."""
    from pipelines.stages.dpo import image_response_logprob_sums, policy_negatives
    from pipelines.tasks import image as task
    from pipelines.tasks import image_model
    from pipelines.tasks.image_data import build_records
    from rto.config import ImageTaskConfig
    from rto.errors import UserError

    model, processor = image_model.tiny_random_vlm(seed=3, n_layers=2)
    settings = ImageTaskConfig(n_sft=1, n_prompts=1, n_eval=1, n_pairs=12, n_eval_pairs=1, seed=2)
    pairs = build_records(settings, tmp_path)["pairs"]
    new, figures = policy_negatives(model, processor, pairs, tmp_path, "pairs.jsonl")
    changed = 0
    for pair, after in zip(pairs, new, strict=True):
        assert {**after, "rejected": pair["rejected"]} == pair  # only the rejected answer moves
        wrong = [c for c in task.answer_choices(pair["prompt"]) if c != pair["chosen"]]
        scores = image_response_logprob_sums(
            model, processor, [{**pair, "c": c} for c in wrong], "c", tmp_path
        ).tolist()
        assert after["rejected"] == wrong[max(range(len(wrong)), key=scores.__getitem__)]
        changed += after["rejected"] != pair["rejected"]
    assert figures["negatives_changed"] == pytest.approx(changed / len(pairs))
    assert 0.0 <= figures["policy_prefers_a_wrong_answer"] <= 1.0
    odd = [*pairs[:2], {**pairs[2], "prompt": "is it a nice picture ?"}]
    with pytest.raises(UserError, match=r"row 3: dpo.negatives 'policy' needs a question") as error:
        policy_negatives(model, processor, odd, tmp_path, "pairs.jsonl")
    assert "pairs.jsonl" in str(error.value) and "\n" not in str(error.value)


def test_policy_negatives_need_the_image_task(tmp_path):
    job = write_job(tmp_path, dpo__negatives="policy")
    result = rto("validate", str(job), timeout=60)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "field 'dpo.negatives'" in line and str(job) in line and "image task" in line
