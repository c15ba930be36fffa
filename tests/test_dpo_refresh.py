"""Online refresh of the DPO token reward (`ppo.dpo_refresh`, issue 20): every K steps the DPO model
takes a DPO update on pairs of the policy's own rollouts. The loss it logs is the DPO loss of the
logged trace rows, the refreshed model is checkpointed with the trainers and saved as a plain
transformers folder, and senseless settings are one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import one_line_error, rto, run_ppo_steps, write_job


def test_pairs_are_each_prompts_best_against_its_worst():
    from rto.ppo.trainer import refresh_pairs

    labels = [0.1, 0.9, 0.5, 0.5, 0.3, 0.2, 0.7, 0.0, 0.2]
    # groups of 3: (0.1, 0.9, 0.5) -> (1, 0); (0.5, 0.3, 0.2) -> (3, 5); (0.7, 0.0, 0.2) -> (6, 7)
    assert refresh_pairs(labels, 3, 0.0) == [(1, 0), (3, 5), (6, 7)]
    assert refresh_pairs(labels, 3, 0.5) == [(1, 0), (6, 7)]  # gaps 0.8, 0.3, 0.7
    assert refresh_pairs([0.4, 0.4, 1.0, 0.0], 2, 0.0) == [(2, 3)]  # a tie makes no pair


def test_refresh_loss_is_the_dpo_loss_of_the_logged_rollouts_and_the_state_is_checkpointed(
    reward_run, tmp_path
):
    """Label = ground truth, 2 samples per prompt, a refresh every step: the loss and accuracy
    logged at step 1 recompute from the step's trace rows (Σ dpo_logprob − Σ ref_logprob of each
    prompt's better and worse answer); step 2 is scored by the refreshed model; a checkpoint holds
    the DPO engine, and loading it brings back the weights it saved."""
    from rto.ppo import checkpoint

    sums = {}

    def between(groups, step, state):
        sums[step] = groups.dpo.run_all("weights_checksum")[0]
        if step == 1:
            checkpoint.save(tmp_path / "ckpt", 1, groups, {**state, "step": 1}, keep=2)
        if step == 2:
            checkpoint.load(tmp_path / "ckpt" / "step-000001", groups)
            sums["restored"] = groups.dpo.run_all("weights_checksum")[0]

    def trainable(groups):
        return groups.dpo_trainable, groups.trainable_names()

    run_dir, records, cfg, inspected = run_ppo_steps(
        reward_run, tmp_path, "run", 2, between, trainable, ppo__samples_per_prompt=2, ppo__rollout_batch_size=8,
        ppo__train_batch_size=16, ppo__micro_batch_size=8, ppo__dpo_refresh__every=1,
        ppo__dpo_refresh__label="ground_truth", ppo__dpo_refresh__lr=1e-3, resources__colocate="all",
    )  # fmt: skip
    assert inspected == (True, {"policy", "critic", "dpo"})
    first, second = records
    assert first["dpo_refreshes"] == 0 and second["dpo_refreshes"] == 1
    rows = pq.read_table(run_dir / "traces" / "step-000001.parquet").to_pylist()
    beta = cfg.ppo.dpo_refresh.beta
    assert beta == cfg.dpo.beta  # None in the job: the dpo stage's
    losses, right = [], []
    for a, b in zip(rows[0::2], rows[1::2], strict=True):
        if a["gt_reward"] == b["gt_reward"]:
            continue
        chosen, rejected = (a, b) if a["gt_reward"] > b["gt_reward"] else (b, a)
        implicit = [sum(r["dpo_logprob"]) - sum(r["ref_logprob"]) for r in (chosen, rejected)]
        margin = beta * (implicit[0] - implicit[1])
        losses.append(math.log1p(math.exp(-margin)))
        right.append(margin > 0)
    assert first["dpo_refresh_pairs"] == len(losses) > 0
    assert abs(first["dpo_refresh_loss"] - sum(losses) / len(losses)) < 1e-4, (first, losses)
    assert abs(first["dpo_refresh_accuracy"] - sum(right) / len(right)) < 1e-6
    assert first["dpo_refresh_last_loss"] == first["dpo_refresh_loss"]  # one epoch
    assert sums[1] != sums[2]  # step 2's refresh changed the weights again
    assert sums["restored"] == sums[1]
    assert (tmp_path / "ckpt" / "step-000001" / "dpo").is_dir()


def test_refreshing_job_saves_the_dpo_model_it_trained(reward_run, tmp_path):
    """`rto run` with a refresh every 2 steps (RM labels): the metrics say when it ran, and the
    stage saves the refreshed DPO model, which plain transformers loads and which differs from the
    dpo stage's."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    shutil.copytree(reward_run, run_dir)
    job = write_job(
        tmp_path, stages=["ppo"], ppo__steps=3, ppo__samples_per_prompt=2, ppo__rollout_batch_size=4,
        ppo__train_batch_size=8, ppo__micro_batch_size=4, ppo__dpo_refresh__every=2,
        ppo__dpo_refresh__lr=1e-3, ppo__dpo_refresh__epochs=2,
    )  # fmt: skip
    result = rto("run", str(job), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in rows if r["stage"] == "ppo"}
    assert [rows[s]["dpo_refreshes"] for s in (1, 2, 3)] == [0, 0, 1]
    assert "dpo_refresh_loss" in rows[2] and "dpo_refresh_loss" not in rows[1] | rows[3]
    assert rows[2]["dpo_refresh_last_loss"] < rows[2]["dpo_refresh_loss"]  # two steps on the same pairs
    refreshed = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "ppo" / "dpo")
    original = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "dpo")
    changed = [
        name
        for (name, p), q in zip(refreshed.state_dict().items(), original.state_dict().values(), strict=True)
        if not torch.equal(p, q)
    ]
    assert changed


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(ppo__dpo_refresh__every=2), ["ppo.dpo_refresh.every", "samples_per_prompt"]),
        (
            dict(ppo__dpo_refresh__every=2, ppo__samples_per_prompt=2, reward__mode="ppo"),
            ["ppo.dpo_refresh.every", "'ppo'"],
        ),
        (
            dict(
                ppo__dpo_refresh__every=2, ppo__samples_per_prompt=2, reward__sentence_reward="ground_truth"
            ),
            ["ppo.dpo_refresh.label", "ground_truth"],
        ),
        (dict(ppo__dpo_refresh__label="judge"), ["ppo.dpo_refresh.label"]),
        (dict(ppo__dpo_refresh__lr=0), ["ppo.dpo_refresh.lr"]),
    ],
)
def test_bad_refresh_settings_are_one_line_errors(tmp_path, changes, words):
    job = write_job(tmp_path, **changes)
    result = rto("validate", str(job))
    one_line_error(result.returncode, result.stderr, [str(job), *words])
