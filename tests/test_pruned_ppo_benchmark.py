"""The pure parts of benchmarks/pruned_ppo.py: the image goals' arithmetic and how a run of one
task replaces its own arms in the results file and keeps the other task's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pruned_ppo  # noqa: E402


def arm(mean: float, se: float, rollout: float = 1.0) -> dict:
    return {
        "final_gt_mean": mean,
        "final_gt_se": se,
        "rollout_seconds_mean": rollout,
        "step_seconds_mean": 2 * rollout,
    }


def test_image_goals_use_the_seed_and_the_binomial_standard_errors():
    quickstart = pruned_ppo.SETUPS["image_quickstart"]  # dense and pruned RTO, and PPO
    arms = {
        "quickstart_dense": arm(0.50, 0.01, rollout=1.0),
        "quickstart_adaptinfer": arm(0.49, 0.01, rollout=0.5),
        "quickstart_ppo": arm(0.52, 0.01),
    }
    out = pruned_ppo.image_results(arms, start=0.45, n_eval=1024, setup=quickstart)
    start_se = (0.45 * 0.55 / 1024) ** 0.5
    dense = out["gains_over_start"]["quickstart_dense"]
    assert dense["gain"] == pytest.approx(0.05)
    assert dense["se"] == pytest.approx((0.01**2 + start_se**2) ** 0.5)
    assert out["goals"]["dense_ppo_beats_start_by_2se"]  # 0.05 > 2 × 0.019
    assert not out["goals"]["rto_at_least_level_with_ppo"]  # −0.02 with a 0.014 standard error
    assert out["goals"]["adaptinfer_within_1se_of_dense"]  # −0.01 within 0.014
    assert out["goals"]["rollout_time_at_most_0.6x_dense"]
    arms["quickstart_dense"] = arm(0.47, 0.01)
    out = pruned_ppo.image_results(arms, start=0.45, n_eval=1024, setup=quickstart)
    assert not out["goals"]["dense_ppo_beats_start_by_2se"]
    assert out["goals"]["rto_at_least_level_with_ppo"] is False


def test_the_benchmark_vlm_setup_compares_rollouts_only():
    """From the benchmark VLM both arms are ground-truth PPO: no RTO-vs-PPO figure, and its goal
    is reported as not measured (None), not as met or failed."""
    arms = {"image_dense": arm(0.88, 0.004, rollout=1.0), "image_adaptinfer": arm(0.87, 0.004, rollout=0.7)}
    out = pruned_ppo.image_results(arms, start=0.835, n_eval=1024, setup=pruned_ppo.SETUPS["image"])
    assert out["rto_minus_ppo"] is None and out["goals"]["rto_at_least_level_with_ppo"] is None
    assert out["goals"]["dense_ppo_beats_start_by_2se"]  # +0.045 against 2 × 0.012
    assert not out["goals"]["adaptinfer_within_1se_of_dense"]  # −0.01 against 0.0057
    assert not out["goals"]["rollout_time_at_most_0.6x_dense"]
    assert pruned_ppo.SETUPS["image"].config.exists() and pruned_ppo.SETUPS["image"].start == "base"


def test_a_task_run_keeps_the_other_tasks_arms(tmp_path):
    path = tmp_path / "pruned_ppo.json"
    old = {"arms": {"dense": {"x": 1}, "ftp": {"x": 2}}, "start_policy_heldout_gt": 0.4, "ratios": {"r": 1}}
    # a file from before the image arms: the text figures at the top level
    path.write_text(json.dumps({"settings": {"steps": 20}, "results": old}))
    results, settings = pruned_ppo.merge_previous(
        path, "image", {"image_dense": {"x": 3}}, {"s": 1}, {"steps": 60}
    )
    assert results["arms"] == {"dense": {"x": 1}, "ftp": {"x": 2}, "image_dense": {"x": 3}}
    assert results["text"] == {"start_policy_heldout_gt": 0.4, "ratios": {"r": 1}}
    assert results["image"] == {"s": 1}
    assert settings == {"text": {"steps": 20}, "image": {"steps": 60}}
    path.write_text(json.dumps({"settings": settings, "results": results}))
    results, _ = pruned_ppo.merge_previous(path, "text", {"dense": {"x": 9}, "ftp": {"x": 8}}, {"t": 1}, {})
    assert results["arms"] == {"dense": {"x": 9}, "ftp": {"x": 8}, "image_dense": {"x": 3}}
    assert results["text"] == {"t": 1} and results["image"] == {"s": 1}


def test_the_careless_quickstart_setup_teaches_every_arm_carelessly():
    """`image_quickstart_careless`: the base (sft, dpo, the start's eval) and every arm are the image
    quickstart with `task.sft_careless` 0.6, so the arms' copied sft/dpo stages stay up to date; a
    user's `--set` comes last and wins."""
    setup = pruned_ppo.SETUPS["image_quickstart_careless"]
    base = pruned_ppo.base_config(setup, ["ppo.steps=7"])
    assert base.task.sft_careless == 0.6 and base.stages == ["sft", "dpo", "eval"]
    assert base.eval.models == ["sft"] and base.ppo.steps == 7
    for name in setup.arms:
        cfg = pruned_ppo.arm_config(setup, name, seed=3, overrides=["task.sft_careless=0.5"])
        assert cfg.task.sft_careless == 0.5 and cfg.stages == ["sft", "dpo", "ppo", "eval"]
        assert cfg.ppo.seed == 3 and cfg.seed == base.seed  # the base stages stay the cached ones
    arms = {name: pruned_ppo.arm_config(setup, name, 0, []) for name in setup.arms}
    assert arms["careless_quickstart_ppo"].reward.mode == "ppo"
    assert arms["careless_quickstart_dense"].reward.mode == "rto"
    assert arms["careless_quickstart_adaptinfer"].ppo.rollout_pruner == "adaptinfer"
    assert arms["careless_quickstart_dense"].task.sft_careless == 0.6
    truthful = pruned_ppo.arm_config(pruned_ppo.SETUPS["image_quickstart"], "quickstart_dense", 0, [])
    assert truthful.task.sft_careless == 0.0  # the quickstart's job with the task's own SFT answers
