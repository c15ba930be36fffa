"""PPO through real Ray actors and DeepSpeed engines: weights reach the rollout workers, a killed
run resumes without gaps or duplicates, a NaN batch is skipped, and traces add up on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import one_line_error, rto, rto_in_process, write_job


def fresh_copy(reward_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(reward_run, target)
    return target


def ppo_steps(run_dir) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["stage"] == "ppo"]


def test_reward_stages_report_their_figures(reward_run):
    summary = json.loads((reward_run / "summary.json").read_text())
    for key in ("dpo_reward_accuracy", "ref_prefers_chosen", "dpo_prefers_chosen", "label_agrees_with_gt"):
        assert 0.0 <= summary["dpo"][key] <= 1.0
    assert 0.0 <= summary["rm"]["rm_pair_accuracy"] <= 1.0
    normalization = json.loads((reward_run / "stages" / "rm" / "normalization.json").read_text())
    assert normalization["std"] > 0


def test_rollout_workers_receive_updated_weights(reward_run, tmp_path):
    """One PPO iteration with a 2-rank DeepSpeed policy: the rollout copy changes and matches, and the
    minibatch of 8 is two accumulated calls of 2 rows per rank ending in exactly one optimizer step
    (the trainer's calls and the engine's gradient accumulation come from one function)."""
    import ray

    from pipelines.prepare import prepare
    from pipelines.prompts import TextPrompts
    from pipelines.stages.rm import load_normalization
    from rto.config import load_config
    from rto.distributed import init_ray
    from rto.models import load_tokenizer
    from rto.ppo.algo import ADVANTAGE_ESTIMATORS, gae_advantages
    from rto.ppo.groups import ModelPaths, build_groups
    from rto.ppo.trainer import PPOInputs, one_step
    from rto.rundir import RunDir

    calls = []

    @ADVANTAGE_ESTIMATORS.register("gae_counted")  # a new estimator: one decorated function
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return gae_advantages(*args, **kwargs)

    run_dir = fresh_copy(reward_run, tmp_path)
    cfg = load_config(
        write_job(tmp_path, stages=["ppo"], ppo__micro_batch_size=2, ppo__advantage_estimator="gae_counted")
    )
    assert cfg.ppo.accumulation_steps(2) == 2 and cfg.ppo.accumulation_steps(1) == 4
    run = RunDir(run_dir)
    prepared = prepare(cfg, run)
    stages = run_dir / "stages"
    paths = ModelPaths(
        policy=str(stages / "sft"),
        critic=str(stages / "rm"),
        ref=str(stages / "sft"),
        dpo=str(stages / "dpo"),
        rm=str(stages / "rm"),
    )
    init_ray(None, 2)
    groups = build_groups(cfg, paths, optimizer_steps=4, dtype="float32")
    try:
        assert groups.policy.num_actors == 2
        before = groups.rollout.run_all("weights_checksum")
        assert before == groups.policy.run_all("weights_checksum")[:1]
        prompts = prepared.records("prompts")
        tokenizer = load_tokenizer(paths.policy)
        inputs = PPOInputs(
            cfg=cfg, run=run, out_dir=tmp_path / "out", paths=paths, prompts=TextPrompts(tokenizer, prompts),
            tokenizer=tokenizer, processing_class=tokenizer, ground_truth=prepared.ground_truth(),
            rm_normalization=load_normalization(stages / "rm"), stage_hash="test", resume=False,
        )  # fmt: skip
        run.traces_dir.mkdir(exist_ok=True)
        state = {"step": 0, "prompts_consumed": 0, "skipped_batches": 0}
        record = one_step(inputs, groups, state, 1)
        after = groups.rollout.run_all("weights_checksum")
        policy_ranks = groups.policy.run_all("weights_checksum")
        assert after != before
        assert after[0] == policy_ranks[0] == policy_ranks[1]
        for group in (groups.policy, groups.critic):  # no extra step, no gradient left pending
            assert [s["global_steps"] for s in group.run_all("training_state")] == [1] * group.num_actors
            assert all(s["optimizer_step"] == 1 for s in group.run_all("training_state"))
        assert record["first_minibatch_ratio_error"] < 1e-4
        assert calls == [{"gamma": cfg.ppo.gamma, "lam": cfg.ppo.lam, "group_size": 1}]  # asked the registry
        for key in (
            "gt_reward",
            "rm_score",
            "kl",
            "policy_loss",
            "value_loss",
            "clip_frac",
            "time_generate",
            "tokens_per_s",
        ):
            assert key in record, key
    finally:
        ADVANTAGE_ESTIMATORS._functions.pop("gae_counted", None)
        groups.shutdown()
        ray.shutdown()


REFRESHING_COLOCATED = dict(
    resources__colocate="all", ppo__samples_per_prompt=2, ppo__rollout_batch_size=4,
    ppo__dpo_refresh__every=2, ppo__dpo_refresh__lr=1e-3,
)  # fmt: skip


@pytest.mark.parametrize("changes", [{}, REFRESHING_COLOCATED], ids=["distributed", "colocated-dpo-refresh"])
def test_kill_during_ppo_then_resume(reward_run, tmp_path, changes):
    """SIGKILL mid-stage, then --resume: every step once in the metrics, the traces and TensorBoard;
    with a refreshing DPO model (colocated), its refresh count continues from the checkpoint."""
    run_dir = fresh_copy(reward_run, tmp_path)
    job = write_job(tmp_path, stages=["ppo", "eval"], ppo__steps=8, ppo__checkpoint_every=2, **changes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rto.cli", "run", str(job), "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(ppo_steps(run_dir), default=0) >= 3:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(ppo_steps(run_dir))
    assert 3 <= killed_at < 8
    assert not (run_dir / "stages" / "ppo").exists()

    refused = rto_in_process("run", str(job), "--run-dir", str(run_dir))
    assert refused.returncode == 2 and "--resume" in refused.stderr  # no silent restart over a checkpoint

    result = rto("run", str(job), "--run-dir", str(run_dir), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    # quiet by default: rto's own progress on the console, the libraries' output in RUN_DIR/rto.log
    for noise in ("Warning", "WARNING", "Started a local Ray", "Token authentication", "Loading weights",
                  "Writing model shards", "pid="):  # fmt: skip
        assert noise not in result.stderr, noise
    assert (run_dir / "rto.log").is_file()
    assert ppo_steps(run_dir) == list(range(1, 9))  # no gap, no duplicate
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in (r for r in metrics if r["stage"] == "ppo"):  # resumed steps too
        assert (
            record["first_minibatch_ratio_error"] < 1e-4 and record["first_minibatch_value_clip_frac"] == 0.0
        )
    traces = sorted(p.name for p in (run_dir / "traces").iterdir())
    assert traces == [f"step-{s:06d}.parquet" for s in range(1, 9)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ppo"]["steps"] == 8
    assert "ppo" in summary["eval"]["policies"]
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard" / "ppo"))
    events.Reload()
    assert [e.step for e in events.Scalars("ppo/kl")] == list(range(1, 9))  # the killed attempt's are purged
    if changes:
        rows = [r for r in metrics if r["stage"] == "ppo"]
        assert [r["dpo_refreshes"] for r in rows] == [(s - 1) // 2 for s in range(1, 9)]
        assert (run_dir / "stages" / "ppo" / "dpo" / "config.json").is_file()

    # the trace file: per-token reward is the sum of its components, read back from disk
    table = pq.read_table(run_dir / "traces" / "step-000008.parquet").to_pylist()
    for row in table:
        n = len(row["token_ids"])
        assert n == len(row["reward"]) == len(row["value"]) == len(row["advantage"]) == len(row["tokens"])
        for h in range(n):
            expected = row["reward_dpo"][h] + row["reward_kl"][h] + (row["rm_score"] if h == n - 1 else 0.0)
            assert abs(row["reward"][h] - expected) < 1e-5
        # advantages and returns recompute from the logged rewards and values by GAE (γ = 1, λ = 0.95)
        advantage, following = [0.0] * n, 0.0
        for h in reversed(range(n)):
            next_value = row["value"][h + 1] if h + 1 < n else 0.0
            following = row["reward"][h] + next_value - row["value"][h] + 0.95 * following
            advantage[h] = following
        assert max(abs(a - b) for a, b in zip(advantage, row["advantage"], strict=True)) < 1e-4
        assert (
            max(abs(a + v - g) for a, v, g in zip(advantage, row["value"], row["return"], strict=True)) < 1e-4
        )


def test_nan_reward_skips_the_batch(reward_run, tmp_path, monkeypatch):
    """Fault injection: the composed reward of step 2 is NaN; the run goes on and counts it. (The
    check is the driver's, on the gathered batch, whatever the layout: colocated, the cheapest.)"""
    import ray
    import torch

    import rto.ppo.trainer as trainer
    from pipelines.runner import run_job
    from rto.config import load_config

    real = trainer.batch_rewards
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        rewards = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            rewards.reward[0, 0] = torch.nan
        return rewards

    monkeypatch.setattr(trainer, "batch_rewards", poisoned)
    run_dir = fresh_copy(reward_run, tmp_path)
    cfg = load_config(
        write_job(tmp_path, stages=["ppo"], ppo__steps=3, ppo__checkpoint_every=10, resources__colocate="all")
    )
    try:
        summary = run_job(cfg, run_dir)
    finally:
        ray.shutdown()  # the stage leaves Ray to the process's exit, as `rto run` ends
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if r["stage"] == "ppo"]
    assert [r["step"] for r in ppo] == [1, 2, 3]
    assert ppo[1].get("skipped") == 1 and ppo[2]["skipped_batches"] == 1
    assert summary["ppo"]["skipped_batches"] == 1
    assert not (run_dir / "traces" / "step-000002.parquet").exists()


def test_score_writes_a_trace_file_whose_reward_adds_up(reward_run, tmp_path):
    run_dir = fresh_copy(reward_run, tmp_path)
    job = write_job(tmp_path, stages=["ppo"])
    out = tmp_path / "scored.parquet"
    result = rto_in_process("score", str(job), "--run-dir", str(run_dir), "-o", str(out), "--samples", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 8
    for row in rows:
        n = len(row["token_ids"])
        assert row["gt_reward"] is not None and row["value"] is None
        for h in range(n):
            expected = row["reward_dpo"][h] + row["reward_kl"][h] + (row["rm_score"] if h == n - 1 else 0.0)
            assert abs(row["reward"][h] - expected) < 1e-5
    # given responses: a good one should not be scored below word salad by the ground truth
    responses = tmp_path / "responses.jsonl"
    responses.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "describe the cat"}], "response": "the kind cat loves a happy dog ."}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "describe the cat"}], "response": "cat cat cat loves"}) + "\n"
    )  # fmt: skip
    result = rto_in_process(
        "score", str(job), "--run-dir", str(run_dir), "--responses", str(responses), "-o", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert rows[0]["gt_reward"] > rows[1]["gt_reward"]
    assert rows[0]["tokens"][-1] == "<eos>"
    # the ground truth as the sentence-level score, as the PPO step would use it (one shared function)
    overrides = ["--set", "reward.mode=ppo", "--set", "reward.sentence_reward=ground_truth"]
    result = rto_in_process(
        "score", str(job), *overrides, "--run-dir", str(run_dir), "-o", str(out), "--samples", "4"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in pq.read_table(out).to_pylist():
        assert row["rm_score"] == pytest.approx(row["gt_reward"], abs=1e-6)
        assert row["reward"][-1] == pytest.approx(row["reward_kl"][-1] + row["gt_reward"], abs=1e-5)


def test_reward_bad_inputs_exit_2(reward_run, tmp_path):
    run_dir = fresh_copy(reward_run, tmp_path)
    job = write_job(tmp_path, stages=["ppo"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "describe the cat"}) + "\n")
    result = rto_in_process("score", str(job), "--run-dir", str(run_dir), "--responses", str(bad))
    assert result.returncode == 2 and "'response'" in result.stderr and str(bad) in result.stderr

    for rows, words in (
        (
            [{"prompt": "describe the cat", "chosen": "", "rejected": "the cat sees a dog ."}],
            ["empty 'chosen'"],
        ),
        ([{"prompt": "describe the cat", "good": "x", "bad": "y"}], ["missing columns", "chosen/rejected"]),
    ):
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "bad").mkdir(exist_ok=True)
        bad_job = write_job(tmp_path / "bad", stages=["dpo"], data={"pairs": {"path": str(pairs)}})
        result = rto_in_process("run", str(bad_job), "--run-dir", str(tmp_path / "x"))
        assert (
            result.returncode == 2 and all(w in result.stderr for w in words) and str(pairs) in result.stderr
        )

    # π_dpo with another tokenizer than π_ref
    from pipelines.tasks import text

    other = text.build_tokenizer()
    other.add_tokens(["zebra"])
    other.save_pretrained(run_dir / "stages" / "dpo")
    result = rto_in_process("score", str(job), "--run-dir", str(run_dir), "--samples", "2")
    assert result.returncode == 2 and "tokenizer" in result.stderr and "dpo" in result.stderr
    assert "Traceback" not in result.stderr


def test_ftp_pruned_rollouts_are_importance_weighted(reward_run, tmp_path):
    """Rollouts sampled by the FTP-pruned policy; PPO recomputes dense log-probs and weights tokens
    by the truncated ratio min(pi_dense / pi_sampler, C). With `sampler_kl_guard` below the step's
    sampler KL, the next step samples with the dense policy, and the one after is pruned again."""
    run_dir = fresh_copy(reward_run, tmp_path)
    job = write_job(
        tmp_path, stages=["ftp", "ppo"], ppo__steps=3, ppo__rollout_pruner="ftp", ppo__is_cap=2.0,
        ppo__temperature=0.7, ppo__top_p=0.9, ppo__sampler_kl_guard=1e-12,
        ftp={"search": {"population": 4, "generations": 2, "calib_samples": 8, "elite": 1}, "train": {"steps": 5, "batch_size": 4}},
    )  # fmt: skip
    result = rto("run", str(job), "--run-dir", str(run_dir), "--verbose")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Started a local Ray instance" in result.stderr  # --verbose: the libraries' output too
    assert "ray: starting beside ftp, for the ppo stage" in result.stderr  # while the router trains
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"ppo"' in x]
    record, fallback, back = records
    assert 0.0 < record["is_weight_mean"] <= 2.0
    assert record["sampler_kl"] > 1e-12 and 0.0 <= record["is_capped_frac"] <= 1.0
    assert (run_dir / "stages" / "ftp" / "router.safetensors").is_file()
    # the guard: step 2 is sampled densely (on-policy: no importance weights, no mismatch to measure)
    assert [r["dense_fallback"] for r in records] == [0, 1, 0]
    assert "is_weight_mean" not in fallback and "sampler_kl" not in fallback
    assert back["sampler_kl"] > 0.0 and "is_weight_mean" in back
    # the policy is scored at the sampling temperature: ratio 1 before any update, whoever sampled
    for r in records:
        assert r["first_minibatch_ratio_error"] < 1e-4 and r["first_minibatch_value_clip_frac"] == 0.0
    meta_file = run_dir / "stages" / "ftp" / "ftp.json"
    meta = json.loads(meta_file.read_text())
    assert meta["task"] == {"name": "text", "variant": "plain"} and meta["tokenizer"]["vocab_size"] > 0

    # a router made for another model, tokenizer or task variant is refused before any actor starts
    for key, value, field in [
        ("fingerprint", {**meta["fingerprint"], "num_hidden_layers": 12}, "fingerprint.num_hidden_layers"),
        ("tokenizer", {**meta["tokenizer"], "vocab_size": 999}, "tokenizer.vocab_size"),
        ("task", {"name": "text", "variant": "facts"}, "task.variant"),
    ]:
        meta_file.write_text(json.dumps({**meta, key: value}))
        again = write_job(tmp_path, stages=["ppo"], ppo__steps=4, ppo__rollout_pruner="ftp")
        result = rto_in_process("run", str(again), "--run-dir", str(run_dir))
        one_line_error(result.returncode, result.stderr, [str(meta_file), field.split(".")[-1], "another"])
        assert "placement" not in result.stdout + result.stderr
    assert ppo_steps(run_dir) == [1, 2, 3]  # nothing was run or lost


def test_heldout_evaluation_during_ppo_equals_the_eval_stage(colocated_rloo_run):
    """`ppo.eval_every` (2, over 3 steps): the held-out figure logged at the last step is the eval
    stage's for the saved policy (greedy decoding, so both must pick the same answers); step 1 has
    none. `ppo.max_prompts` (6): every rollout's prompt is one of the first 6. (The shared colocated
    RLOO run, conftest.py.)"""
    job, run_dir, _ = colocated_rloo_run
    rows = {
        r["step"]: r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["stage"] == "ppo"
    }
    assert sorted(rows) == [1, 2, 3]
    assert "heldout_gt" not in rows[1] and "heldout_gt" in rows[2] and "heldout_gt" in rows[3]
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["eval"]["policies"]["ppo"]
    assert abs(rows[3]["heldout_gt"] - final["gt_reward"]) < 1e-6, (rows[3], final)
    assert abs(rows[3]["heldout_gt_se"] - final["gt_se"]) < 1e-6

    from pipelines.prepare import prepare
    from rto.config import load_config
    from rto.generation import prompt_text
    from rto.rundir import RunDir

    records = prepare(load_config(job), RunDir(run_dir)).records("prompts")
    allowed = {prompt_text(r["prompt"]) for r in records[:6]}
    seen = {
        row["prompt"] for step in (1, 2, 3) for row in pq.read_table(trace_file(run_dir, step)).to_pylist()
    }
    assert seen and seen <= allowed, seen - allowed


def trace_file(run_dir, step):
    return run_dir / "traces" / f"step-{step:06d}.parquet"


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(ppo__max_prompts=100_000), ["ppo.max_prompts", "100000"]),
        (dict(ppo__max_prompts=0), ["ppo.max_prompts"]),
        (dict(ppo__eval_every=-1), ["ppo.eval_every"]),
    ],
)
def test_bad_prompt_budget_or_eval_cadence_is_a_one_line_error(reward_run, tmp_path, changes, words):
    run_dir = fresh_copy(reward_run, tmp_path)
    job = write_job(tmp_path, stages=["ppo"], ppo__steps=1, **changes)
    result = rto_in_process("run", str(job), "--run-dir", str(run_dir))
    one_line_error(result.returncode, result.stderr, [*words])
    assert not (run_dir / "stages" / "ppo" / "policy").exists()
