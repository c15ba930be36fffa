"""Model-family conformance: `sft → dpo → rm → ppo (2 steps) → eval` on random-init models of the
families users bring, each with a tokenizer built locally to that family's conventions
(`tests/model_families.py`): Llama-3 (no pad, <|eot_id|> ends a turn, header tokens), Qwen2
(ChatML, a newline after <|im_end|>, a padded vocabulary), Mistral ([INST] template, no pad) and
GPT-2 (dropout 0.1 in its config, no pad, plain-string data).

For each, on real TRL trainers, DeepSpeed engines and Ray actors, sampling at temperature 0.7 with
top-p 0.9: the first PPO minibatch has ratio 1 and no clipped value; the reward-model score PPO
used is the score `AutoModelForSequenceClassification` gives the same tokens pooled as TRL trained
it; no rollout holds a pad or special token other than EOS; every stage output reloads with plain
transformers and generates. The Llama-3 run uses ZeRO-3 on 2 ranks, the others ZeRO-2.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from model_families import FAMILIES, is_chat_family, save_family_model, write_family_data
from pipeline_helpers import rto

pytestmark = pytest.mark.slow


def family_job(family: str, root: Path) -> Path:
    data = write_family_data(
        family, root / "data", n_sft=128, n_pairs=64, n_eval_pairs=16, n_prompts=32, n_eval=8
    )
    policy = save_family_model(family, root / "policy", size="policy", seed=0)
    reward_base = save_family_model(family, root / "rm-base", size="rm", seed=1)
    job = {
        "seed": 0,
        "device": "cpu",
        "stages": ["sft", "dpo", "rm", "ppo", "eval"],
        "task": None,
        "data": {role: {"path": str(path)} for role, path in data.items()},
        "policy": {"path": str(policy)},
        "reward_model": {"path": str(reward_base)},
        "sft": {"max_steps": 20, "batch_size": 16, "lr": 1e-2, "max_length": 96},
        "dpo": {"max_steps": 3, "batch_size": 8, "max_length": 96},
        "rm": {"max_steps": 3, "batch_size": 8, "max_length": 96},
        "ppo": {
            "steps": 2, "rollout_batch_size": 8, "train_batch_size": 8, "micro_batch_size": 4,
            "max_new_tokens": 12, "temperature": 0.7, "top_p": 0.9, "checkpoint_every": 1,
            "tensorboard": False, "zero_stage": 3 if family == "llama3" else 2,
        },
        "reward": {"rm_clamp": 1.0e6},  # the barely trained RM's std is tiny: never clamp, compare exactly
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "resources": {"num_cpus": 2, "policy": {"ranks": 2, "cpus": 0.25}},
    }  # fmt: skip
    path = root / "job.yaml"
    path.write_text(json.dumps(job))
    return path


@pytest.fixture(scope="module")
def family_jobs(request, tmp_path_factory):
    """The `rto run` of every family whose tests were selected, two at a time (much of a run is one
    process at work, such as starting the PPO actors one after another: the other core runs the
    other job); the tests of a family wait for its own."""
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items]
    selected = {p["family_run"] for p in params if "family_run" in p}
    families = [family for family in FAMILIES if family in selected]
    roots = {family: tmp_path_factory.mktemp(family) for family in families}
    jobs = {family: family_job(family, root) for family, root in roots.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            family: pool.submit(
                rto, "run", str(jobs[family]), "--run-dir", str(roots[family] / "run"), timeout=900
            )
            for family in families
        }
        yield {family: (futures[family], roots[family] / "run") for family in families}
        for future in futures.values():
            future.cancel()


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, family_jobs):
    family = request.param
    future, run = family_jobs[family]
    result = future.result()
    assert result.returncode == 0, result.stderr[-4000:]
    return {"family": family, "run": run}


def ppo_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "ppo"]


def trace_rows(run: Path) -> list[dict]:
    return [
        row
        for step in (1, 2)
        for row in pq.read_table(run / "traces" / f"step-{step:06d}.parquet").to_pylist()
    ]


def test_first_minibatch_has_ratio_one_and_no_clipped_value(family_run):
    steps = ppo_metrics(family_run["run"])
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["first_minibatch_ratio_error"] < 1e-4, record
        assert record["first_minibatch_value_clip_frac"] == 0.0, record


def test_rm_score_is_the_score_trl_trained_on_the_same_tokens(family_run):
    """Undo the trace's normalisation, then score prompt + response with plain transformers: as one
    unpadded row and in a right-padded batch (TRL's layout), pooled by the model itself."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rto.generation import encode_prompt

    run, chat = family_run["run"], is_chat_family(family_run["family"])
    rm_dir = run / "stages" / "rm"
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    norm = json.loads((rm_dir / "normalization.json").read_text())
    rows = trace_rows(run)
    sequences = []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
        sequences.append(encode_prompt(tokenizer, prompt) + row["token_ids"])
    width = max(map(len, sequences))
    padded = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        batch_scores = model(input_ids=padded).logits[:, 0]
        for row, ids, in_batch in zip(rows, sequences, batch_scores, strict=True):
            alone = model(input_ids=torch.tensor([ids])).logits[0, 0]
            used = row["rm_score"] * norm["std"] + norm["mean"]  # beta3 1, no clamp
            assert float(alone) == pytest.approx(used, abs=1e-4)
            assert float(in_batch) == pytest.approx(used, abs=1e-4)


def test_rollouts_hold_no_pad_or_special_token_but_eos(family_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_run["run"] / "stages" / "ppo" / "policy")
    forbidden = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    assert tokenizer.pad_token_id in forbidden
    rows = trace_rows(family_run["run"])
    assert sum(len(r["token_ids"]) for r in rows) > 30
    for row in rows:
        assert not forbidden & set(row["token_ids"]), row["tokens"]
        assert tokenizer.eos_token_id not in row["token_ids"][:-1]  # a response ends at its EOS


def test_stage_outputs_reload_with_plain_transformers_and_generate(family_run):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    stages = family_run["run"] / "stages"
    for folder in (stages / "sft", stages / "dpo", stages / "ppo" / "policy"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = tokenizer("the cat", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] == ids["input_ids"].shape[1] + 3 or tokenizer.eos_token_id in out[0].tolist()
        assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert AutoModelForSequenceClassification.from_pretrained(stages / "rm").config.num_labels == 1
    critic = AutoModelForTokenClassification.from_pretrained(stages / "ppo" / "critic")
    assert critic.config.num_labels == 1
    summary = json.loads((family_run["run"] / "summary.json").read_text())
    assert set(summary["eval"]["policies"]) >= {"sft", "dpo", "ppo"}
    assert all("rm_score" in p for p in summary["eval"]["policies"].values())
