"""The pure parts of benchmarks/rto_map.py: per-cell figures from per-run curves, the fraction of
PPO's rollouts a method needs to reach PPO's final held-out figure, the paired difference and the
goals' verdicts."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import rto_map  # noqa: E402

STEPS = [5, 10, 15, 20]


def run(rm, method, seed, curve, budget=1.0):
    spec = {"rm": rm, "budget": budget, "method": method, "seed": seed, "prompts": round(1024 * budget)}
    result = {**spec, "eval_steps": STEPS, "curve": curve, "seconds": 1.0, "response_length": [10.0, 12.0]}
    return spec, result


def cells_of(curves: dict, rm="weak", budget=1.0):
    specs, runs = [], []
    for (method, seed), curve in curves.items():
        spec, result = run(rm, method, seed, curve, budget)
        specs.append(spec)
        runs.append(result)
    return specs, runs


def test_a_cell_reads_fractions_differences_and_goals_off_the_held_out_curves():
    curves = {
        ("ppo", 0): [0.1, 0.2, 0.3, 0.4],
        ("ppo", 1): [0.1, 0.2, 0.3, 0.6],  # PPO's final mean: 0.5
        ("rto", 0): [0.2, 0.5, 0.6, 0.7],
        ("rto", 1): [0.2, 0.5, 0.7, 0.9],  # mean curve 0.2, 0.5, ...: reaches 0.5 at step 10 of 20
    }
    specs, runs = cells_of(curves)
    args = Namespace(methods=["rto", "ppo"], seeds=[0, 1], steps=20)
    info = {"weak": {"heldout_pair_accuracy": 0.62}}
    results = rto_map.summarize([("weak", 1.0)], specs, runs, args, info, {"sft": 0.1}, 0.75)
    cell = results["cells"][0]
    assert cell["prompts"] == 1024 and cell["rm_pair_accuracy"] == 0.62
    assert cell["ppo_final_heldout_gt"] == pytest.approx(0.5)
    rto = cell["methods"]["rto"]
    assert rto["final_heldout_gt"]["mean"] == pytest.approx(0.8)
    assert rto["final_heldout_gt"]["se"] == pytest.approx(0.1)  # stdev 0.1414 / sqrt 2
    assert rto["rollout_fraction_to_reach_ppo_final"] == pytest.approx(0.5)
    assert cell["methods"]["ppo"]["rollout_fraction_to_reach_ppo_final"] == pytest.approx(1.0)
    # paired by seed: differences 0.3 and 0.3, so no spread
    assert rto["minus_ppo"]["mean"] == pytest.approx(0.3) and rto["minus_ppo"]["se"] == pytest.approx(0.0)
    goals = results["goals"]
    assert goals["cells"][0]["level"] and goals["cells"][0]["ahead"]
    assert goals["cells"][0]["quarter_of_rollouts"] is False  # 0.5 of PPO's rollouts, not 1/4
    assert goals["level_everywhere"] and goals["ahead_below_ceiling"]
    assert not goals["quarter_of_rollouts_below_ceiling"]


def test_a_method_that_never_reaches_ppo_has_no_fraction_and_a_lower_one_is_not_level():
    curves = {
        ("ppo", 0): [0.3, 0.5, 0.7, 0.9],
        ("ppo", 1): [0.3, 0.5, 0.7, 0.8],
        ("rto", 0): [0.3, 0.4, 0.5, 0.6],
        ("rto", 1): [0.3, 0.4, 0.5, 0.5],
    }
    specs, runs = cells_of(curves, rm="ground_truth")
    args = Namespace(methods=["rto", "ppo"], seeds=[0, 1], steps=20)
    info = {"ground_truth": {"heldout_pair_accuracy": 0.757}}
    results = rto_map.summarize([("ground_truth", 1.0)], specs, runs, args, info, {}, 0.757)
    rto = results["cells"][0]["methods"]["rto"]
    assert rto["rollout_fraction_to_reach_ppo_final"] is None
    verdict = results["goals"]["cells"][0]
    assert not verdict["level"] and not verdict["needs_ahead"]  # at the label ceiling only "level" is asked
    assert verdict["quarter_of_rollouts"] is None
    assert results["goals"]["ahead_below_ceiling"]  # no imperfect-RM cell in this map


def test_the_markdown_table_has_one_row_per_cell(capsys):
    curves = {("ppo", 0): [0.1, 0.2, 0.3, 0.4], ("ppo", 1): [0.1, 0.2, 0.3, 0.6]}
    curves |= {("rto", 0): [0.2, 0.5, 0.6, 0.7], ("rto", 1): [0.2, 0.5, 0.7, 0.9]}
    specs, runs = cells_of(curves)
    args = Namespace(methods=["rto", "ppo"], seeds=[0, 1], steps=20)
    results = rto_map.summarize(
        [("weak", 1.0)], specs, runs, args, {"weak": {"heldout_pair_accuracy": 0.62}}, {}, 0.75
    )
    rto_map.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| weak (0.620) | 1024 | 0.800 ± 0.100 | 0.500 ± 0.100 | +0.300 ± 0.000 | rto 0.50 |"
