"""When does the token reward help? RTO, sentence-level PPO and the paper's variants, mapped over the
reward model's quality and the prompt budget (issue 20).

    python benchmarks/rto_map.py --seeds 0 1 2 --steps 60 --eval-every 5 --jobs 2

SFT and DPO are trained once; one reward model is trained per quality setting (fewer optimizer steps
give a worse one; `ground_truth` puts the task's rule reward in the RM's place: the label ceiling).
Every method starts from the same models with the quickstart's settings and differs only in
``reward.mode``. Two axes, crossed at one point:

* reward-model quality, at the full prompt set;
* the prompt budget (``ppo.max_prompts`` = 1/8, 1/4, 1/2 of the prompts), at ``--budget-rm``.
  Every budget runs the same number of steps and rollouts (matched compute): a smaller budget sees
  each prompt more often, the paper's data-fraction question at equal training cost.

Each run evaluates its policy on the held-out prompts every ``--eval-every`` steps (``ppo.eval_every``,
the eval section's temperature 0.7), so "the fraction of PPO's rollouts a method needs to reach PPO's
final held-out ground truth" is read off held-out evaluations, not off the temperature-1 training
reward. Runs go ``--jobs`` at a time, each in its own process (one torch thread each with 2 jobs on
2 cores); a run whose result exists is not run again, so an interrupted sweep continues where it
stopped. Writes benchmarks/results/rto_map.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

# name -> (overrides of the rm stage, overrides of the ppo stage)
RM_SETTINGS = {
    "near_chance": (["rm.max_steps=1"], []),
    "weak": (["rm.max_steps=8"], []),
    "fair": (["rm.max_steps=24"], []),
    "trained": ([], []),
    "ground_truth": ([], ["reward.sentence_reward=ground_truth"]),
}
METHODS = {
    "rto": ["reward.mode=rto"],
    "ppo": ["reward.mode=ppo"],
    "semi_rto": ["reward.mode=semi_rto"],
    "delayed": ["reward.mode=delayed"],
    "rs_ppo": ["reward.mode=rs_ppo"],
    # the online DPO refresh (not in the default sweep): 32 prompts x 2 samples = the same 64
    # rollouts a step, every 5 steps a DPO update on each prompt's best-vs-worst pair by the RM
    "rto_g2": ["reward.mode=rto", "ppo.rollout_batch_size=32", "ppo.samples_per_prompt=2"],
    "rto_refresh": [
        "reward.mode=rto",
        "ppo.rollout_batch_size=32",
        "ppo.samples_per_prompt=2",
        "ppo.dpo_refresh.every=5",
        "ppo.dpo_refresh.label=rm",
        "ppo.dpo_refresh.lr=1e-4",
    ],
}
DEFAULT_METHODS = ["rto", "ppo", "semi_rto", "delayed", "rs_ppo"]
BUDGETS = (0.125, 0.25, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(QUICKSTART))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        choices=list(METHODS),
        help="reward modes (and the online-refresh arms rto_g2, rto_refresh)",
    )
    parser.add_argument("--rm-settings", nargs="+", default=list(RM_SETTINGS), choices=list(RM_SETTINGS))
    parser.add_argument("--budgets", type=float, nargs="*", default=list(BUDGETS))
    parser.add_argument("--budget-rm", default="trained", choices=list(RM_SETTINGS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    parser.add_argument("--work-dir", default="runs/bench-rto-map")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--name", default="rto_map")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one PPO job (a JSON spec)
    args = parser.parse_args()
    if args.one:
        return run_one(json.loads(args.one))

    from pipelines.runner import run_job
    from rto.config import load_config

    work = Path(args.work_dir)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    common = [f"ppo.steps={args.steps}", f"resources.actor_threads={threads}", *args.overrides]
    base = work / "base"
    print("training sft, dpo and the trained rm once ...", flush=True)
    cfg = load_config(args.config, ["stages=[sft,dpo,rm,eval]", "eval.models=[sft,dpo]", *common])
    n_prompts = cfg.task.n_prompts
    summary = run_job(cfg, base)
    references = {name: summary["eval"]["policies"][name]["gt_reward"] for name in ("sft", "dpo")}
    ceiling = summary["dpo"]["label_agrees_with_gt"]
    needed = set(args.rm_settings) | ({args.budget_rm} if args.budgets else set())
    rm_info = {}
    for name in [n for n in RM_SETTINGS if n in needed]:
        rm_overrides, _ = RM_SETTINGS[name]
        folder = work / f"rm-{name}"
        if not (folder / "rm_summary.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "stages").mkdir(parents=True)
            shutil.copytree(base / "prepared", folder / "prepared")
            for stage in ("sft", "dpo", "rm"):
                shutil.copytree(base / "stages" / stage, folder / "stages" / stage)
            rm_summary = summary["rm"]
            if rm_overrides:
                shutil.rmtree(folder / "stages" / "rm")
                rm_cfg = load_config(args.config, ["stages=[rm]", *rm_overrides, *common])
                rm_summary = run_job(rm_cfg, folder)["rm"]
            (folder / "rm_summary.json").write_text(json.dumps(rm_summary))
        accuracy = json.loads((folder / "rm_summary.json").read_text())["rm_pair_accuracy"]
        rm_info[name] = {
            "rm_overrides": rm_overrides,
            "ppo_overrides": RM_SETTINGS[name][1],
            # the task's rule reward in the RM's place agrees with the labels as often as they agree with it
            "heldout_pair_accuracy": ceiling if name == "ground_truth" else accuracy,
            "trained_rm_accuracy": accuracy,
        }
        print(f"rm setting {name}: held-out pairwise accuracy {rm_info[name]['heldout_pair_accuracy']:.3f}")

    cells = [(rm, 1.0) for rm in args.rm_settings] + [(args.budget_rm, b) for b in args.budgets if b < 1]
    specs = []
    for rm, budget in cells:
        for seed in args.seeds:
            for method in args.methods:
                prompts = round(n_prompts * budget)
                overrides = [
                    "stages=[ppo]", f"seed={seed}", f"ppo.eval_every={args.eval_every}",
                    f"ppo.checkpoint_every={args.steps}", *METHODS[method], *RM_SETTINGS[rm][1], *common,
                ]  # fmt: skip
                if budget < 1:
                    overrides.append(f"ppo.max_prompts={prompts}")
                run_dir = work / f"{rm}-b{budget:g}" / f"{method}-seed{seed}"
                specs.append(
                    {
                        "config": args.config, "overrides": overrides, "run_dir": str(run_dir),
                        "source": str(work / f"rm-{rm}"), "rm": rm, "budget": budget, "method": method,
                        "seed": seed, "prompts": prompts,
                    }
                )  # fmt: skip
    started = time.perf_counter()
    done = 0

    def launch(spec: dict) -> dict:
        nonlocal done
        result_file = Path(spec["run_dir"]) / "result.json"
        if not result_file.exists():
            Path(spec["run_dir"]).parent.mkdir(parents=True, exist_ok=True)
            with open(Path(spec["run_dir"]).parent / f"{Path(spec['run_dir']).name}.log", "w") as log:
                code = subprocess.call(
                    [sys.executable, __file__, "--one", json.dumps(spec)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if code != 0:
                raise SystemExit(f"run {spec['run_dir']} failed (exit {code}); see its .log")
        result = json.loads(result_file.read_text())
        done += 1
        print(
            f"[{done}/{len(specs)} {time.perf_counter() - started:.0f}s] {spec['rm']} budget {spec['budget']:g} "
            f"{spec['method']} seed {spec['seed']}: final held-out gt {result['curve'][-1]:.3f}",
            flush=True,
        )
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(launch, specs))

    results = summarize(cells, specs, runs, args, rm_info, references, ceiling)
    results["rollouts_per_step"] = cfg.ppo.rollout_batch_size * cfg.ppo.samples_per_prompt
    settings = {
        "config": args.config, "seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every,
        "overrides": common, "methods": args.methods, "rm_settings": args.rm_settings,
        "budgets": args.budgets, "budget_rm": args.budget_rm, "jobs": args.jobs, "n_prompts": n_prompts,
        "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    out = write_results(args.name, settings, results)
    plot(results, RESULTS / f"{args.name}.png")
    print_table(results)
    print(f"wrote {out}")


def run_one(spec: dict) -> None:
    """One PPO run (a fresh process): copy the setting's trained models, run, keep the curve."""
    from pipelines.runner import run_job
    from rto.config import load_config

    run_dir, source = Path(spec["run_dir"]), Path(spec["source"])
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "stages").mkdir(parents=True)
    shutil.copytree(source / "prepared", run_dir / "prepared")
    for stage in ("sft", "dpo", "rm"):
        shutil.copytree(source / "stages" / stage, run_dir / "stages" / stage)
    started = time.perf_counter()
    run_job(load_config(spec["config"], spec["overrides"]), run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "ppo"]
    evaluated = [r for r in rows if "heldout_gt" in r]
    result = {
        **spec,
        "seconds": time.perf_counter() - started,
        "eval_steps": [r["step"] for r in evaluated],
        "curve": [r["heldout_gt"] for r in evaluated],
        "curve_se": [r["heldout_gt_se"] for r in evaluated],
        "training_gt": [r.get("gt_reward") for r in rows],
        "response_length": [r.get("response_length") for r in rows],
    }
    shutil.rmtree(run_dir / "stages", ignore_errors=True)  # the models: 5 MB a run, not needed again
    shutil.rmtree(run_dir / "prepared", ignore_errors=True)
    (run_dir / "result.json").write_text(json.dumps(result))


def mean_se(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "se": statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None,
        "per_seed": values,
    }


def summarize(cells, specs, runs, args, rm_info, references, ceiling) -> dict:
    by_key = {(s["rm"], s["budget"], s["method"], s["seed"]): r for s, r in zip(specs, runs, strict=True)}
    table = []
    for rm, budget in cells:
        row: dict = {
            "rm": rm,
            "rm_pair_accuracy": rm_info[rm]["heldout_pair_accuracy"],
            "budget": budget,
            "prompts": round(budget * specs[0]["prompts"] / specs[0]["budget"]),
            "methods": {},
        }
        for method in args.methods:
            seeds = [by_key[(rm, budget, method, s)] for s in args.seeds]
            steps = seeds[0]["eval_steps"]
            mean_curve = [statistics.fmean(c) for c in zip(*(r["curve"] for r in seeds), strict=True)]
            row["methods"][method] = {
                "final_heldout_gt": mean_se([r["curve"][-1] for r in seeds]),
                "curve": {"steps": steps, "mean": mean_curve, "per_seed": [r["curve"] for r in seeds]},
                "final_response_length": statistics.fmean(r["response_length"][-1] for r in seeds),
                "seconds": statistics.fmean(r["seconds"] for r in seeds),
            }
        if "ppo" in row["methods"]:
            target = row["methods"]["ppo"]["final_heldout_gt"]["mean"]
            row["ppo_final_heldout_gt"] = target
            ppo_seeds = row["methods"]["ppo"]["final_heldout_gt"]["per_seed"]
            for entry in row["methods"].values():
                curve, steps = entry["curve"]["mean"], entry["curve"]["steps"]
                reached = next((s for s, v in zip(steps, curve, strict=True) if v >= target), None)
                entry["rollout_fraction_to_reach_ppo_final"] = (
                    None if reached is None else reached / args.steps
                )
                diffs = [a - b for a, b in zip(entry["final_heldout_gt"]["per_seed"], ppo_seeds, strict=True)]
                entry["minus_ppo"] = mean_se(diffs)  # paired by seed: same prompts, same first rollouts
        table.append(row)
    return {
        "label_ceiling": ceiling,
        "rm_settings": rm_info,
        "reference_heldout_gt": references,
        "cells": table,
        "goals": goals(table),
    }


def goals(table: list[dict]) -> dict:
    """The issue's goals, cell by cell: RTO level with PPO (difference ≥ −1 SE of the paired
    difference) everywhere, ahead (> +1 SE) below the label ceiling, and within 1/4 of PPO's
    rollouts of its final held-out figure where the RM is imperfect."""
    out = []
    for row in table:
        if "rto" not in row["methods"] or "ppo" not in row["methods"]:
            continue
        diff = row["methods"]["rto"]["minus_ppo"]
        se = diff["se"] or 0.0
        fraction = row["methods"]["rto"]["rollout_fraction_to_reach_ppo_final"]
        imperfect = row["rm"] != "ground_truth"
        out.append(
            {
                "rm": row["rm"], "budget": row["budget"], "rto_minus_ppo": diff["mean"], "se": se,
                "level": diff["mean"] >= -se, "ahead": diff["mean"] > se, "needs_ahead": imperfect,
                "rollout_fraction": fraction,
                "quarter_of_rollouts": None if not imperfect else (fraction is not None and fraction <= 0.25),
            }
        )  # fmt: skip
    return {
        "cells": out,
        "level_everywhere": all(c["level"] for c in out),
        "ahead_below_ceiling": all(c["ahead"] for c in out if c["needs_ahead"]),
        "quarter_of_rollouts_below_ceiling": all(c["quarter_of_rollouts"] for c in out if c["needs_ahead"]),
    }


def print_table(results: dict) -> None:
    """The map as a Markdown table (what benchmarks/README.md shows): final held-out ground truth,
    mean ± SE over seeds, RTO − PPO paired by seed, and the fraction of PPO's rollouts each method
    needs to reach PPO's final held-out figure (— where it never does)."""
    methods = list(results["cells"][0]["methods"])

    def fraction(value) -> str:
        return "—" if value is None else f"{value:.2f}"

    header = ["RM (held-out pair acc.)", "prompts", *methods, "RTO − PPO", "rollouts to reach PPO's final"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in results["cells"]:
        figures = []
        for m in methods:
            final = row["methods"][m]["final_heldout_gt"]
            figures.append(f"{final['mean']:.3f} ± {final['se'] or 0:.3f}")
        rto, reach = row["methods"].get("rto"), []
        diff = (
            f"{rto['minus_ppo']['mean']:+.3f} ± {rto['minus_ppo']['se'] or 0:.3f}"
            if rto and "minus_ppo" in rto
            else "-"
        )
        for m in methods:
            if m != "ppo":
                reach.append(f"{m} {fraction(row['methods'][m].get('rollout_fraction_to_reach_ppo_final'))}")
        label = f"{row['rm']} ({row['rm_pair_accuracy']:.3f})"
        print(f"| {label} | {row['prompts']} | " + " | ".join(figures) + f" | {diff} | {', '.join(reach)} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    methods = list(cells[0]["methods"])
    colors = {"rto": "tab:red", "ppo": "tab:blue", "semi_rto": "tab:orange", "delayed": "tab:green",
              "rs_ppo": "tab:purple"}  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    full = sorted((r for r in cells if r["budget"] == 1.0), key=lambda r: r["rm_pair_accuracy"])
    budget_rm = next((r["rm"] for r in cells if r["budget"] < 1), None)
    budgets = sorted(
        (r for r in cells if r["rm"] == budget_rm and (r["budget"] < 1 or r in full)),
        key=lambda r: r["budget"],
    )
    for m in methods:
        for ax, rows, key in ((axes[0], full, "rm_pair_accuracy"), (axes[1], budgets, "budget")):
            if not rows:
                continue
            x = [r[key] for r in rows]
            y = [r["methods"][m]["final_heldout_gt"]["mean"] for r in rows]
            e = [r["methods"][m]["final_heldout_gt"]["se"] or 0 for r in rows]
            ax.errorbar(x, y, yerr=e, label=m, color=colors.get(m), marker="o", capsize=3)
    for ref, value in results["reference_heldout_gt"].items():
        for ax in axes[:2]:
            ax.axhline(value, linestyle="--", color="gray" if ref == "sft" else "tab:green", alpha=0.5)
    axes[0].set_xlabel("reward model's held-out pairwise accuracy (rightmost: the label ceiling)")
    axes[0].set_ylabel("final held-out ground truth (mean ± SE, 3 seeds)")
    axes[0].set_title("Reward-model quality (all prompts)")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel(f"prompt budget (fraction of the prompts; rm: {budget_rm})")
    axes[1].set_title("Prompt budget (same steps and rollouts)")
    rto_cell = next((r for r in full if r["rm"] == "trained"), full[0] if full else None)
    if rto_cell is not None:
        for m in methods:
            curve = rto_cell["methods"][m]["curve"]
            axes[2].plot(curve["steps"], curve["mean"], label=m, color=colors.get(m))
        axes[2].axhline(rto_cell.get("ppo_final_heldout_gt", 0), color="tab:blue", linestyle=":", alpha=0.6)
        axes[2].set_xlabel("PPO step")
        axes[2].set_ylabel("held-out ground truth")
        axes[2].set_title(f"Held-out curve, rm {rto_cell['rm']}, all prompts")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
