"""The image task through the staged pipeline: SFT of a tiny VLM with TRL, PPO whose rollout
workers generate with AdaptInfer pruning (pictures carried through rollout, scorers and losses),
and the evaluation of dense and pruned policies; plus the bad inputs of issue 6."""

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
    "stages": ["sft", "ppo", "eval"],
    "task": {"name": "image", "n_sft": 256, "n_prompts": 32, "n_eval": 16},
    "policy": {"builtin": "tiny-llava", "arch": TINY_VLM_ARCH},
    "sft": {"max_steps": 12, "batch_size": 16, "lr": 3e-3},
    "ppo": {
        "steps": 2, "rollout_batch_size": 8, "train_batch_size": 8, "micro_batch_size": 8,
        "max_new_tokens": 4, "checkpoint_every": 1, "rollout_pruner": "adaptinfer",
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
    """A finished sft → ppo (AdaptInfer rollouts) → eval run of the image task."""
    root = tmp_path_factory.mktemp("image")
    result = rto("run", str(write_image_job(root)), "--run-dir", str(root / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_image_job_runs_ppo_with_pruned_rollouts(image_run):
    summary = json.loads((image_run / "summary.json").read_text())
    assert summary["sft"]["steps"] == 12
    assert summary["ppo"]["reward_mode"] == "ppo"
    rows = [json.loads(line) for line in (image_run / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if r["stage"] == "ppo"]
    assert [r["step"] for r in ppo] == [1, 2]
    # the pruned sampler is not the dense policy: PPO weighted its tokens (truncated IS)
    assert all(0 < r["is_weight_mean"] <= 2.0 for r in ppo)
    assert all(0.0 <= r["gt_reward"] <= 1.0 for r in ppo)
    assert ppo[1]["kl"] != 0.0  # the first update moved the policy away from the reference

    table = pq.read_table(image_run / "traces" / "step-000002.parquet").to_pylist()
    assert len(table) == 8
    for row in table:
        assert row["prompt"].startswith("[prompts-") and row["prompt"].endswith("?")
        # the ground truth is the sentence-level reward, added unnormalised at the last token
        assert row["rm_score"] == pytest.approx(row["gt_reward"])
        assert sum(row["reward"]) == pytest.approx(sum(row["reward_kl"]) + row["rm_score"], abs=1e-5)
        assert "<image>" not in row["tokens"]  # the policy never emits its image placeholder

    evals = summary["eval"]["policies"]
    assert {"base", "sft", "ppo", "sft+adaptinfer", "ppo+adaptinfer"} <= set(evals)
    assert all(evals[name]["samples"] == 16 for name in evals)


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
        ({"stages": ["sft", "dpo"]}, "stages"),
        ({"reward": {"mode": "rto"}}, "reward.mode"),
        ({"ppo": {"rollout_pruner": "ftp"}}, "ppo.rollout_pruner"),
        ({"adaptinfer": {"keep_ratio": 0.25, "preset": "llava-1.5-64"}}, "adaptinfer"),
        ({"policy": {"builtin": "tiny-llama"}}, "policy.builtin"),
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
