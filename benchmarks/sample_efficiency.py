"""RTO vs sentence-level PPO vs DPO on the built-in task, same budget, several seeds.

    python benchmarks/sample_efficiency.py --seeds 0 1 2 --steps 40

SFT, DPO and the RM are trained once (as in the paper, every method starts from the same models);
then for each seed the `ppo` stage runs in mode `rto` and in mode `ppo` with identical settings
(learning rates, KL coefficient, batch sizes, critic initialised from the RM), and with
`--modes rto ppo rto_reinforce_pp` also with the RTO reward and REINFORCE++ (no critic). The curve is the
ground-truth reward of each step's training rollouts against the number of rollouts so far; the
final figures are held-out ground truth from the `eval` stage. Writes
benchmarks/results/sample_efficiency.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402

from pipelines.runner import run_job  # noqa: E402
from rto.config import load_config  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

# Each arm's overrides of the ppo stage: a reward mode, and for the critic-free arm an estimator.
ARMS = {
    "rto": ["reward.mode=rto"],
    "ppo": ["reward.mode=ppo"],
    "rto_reinforce_pp": ["reward.mode=rto", "ppo.advantage_estimator=reinforce_pp"],
}


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(QUICKSTART))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--modes", nargs="+", default=["rto", "ppo"], choices=sorted(ARMS),
        help="arms: rto, ppo (sentence-level), rto_reinforce_pp (the RTO reward with REINFORCE++, no critic)",
    )  # fmt: skip
    parser.add_argument("--work-dir", default="runs/bench-sample-efficiency")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window over steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument(
        "--name", default="sample_efficiency", help="results name (benchmarks/results/NAME.json/.png)"
    )
    args = parser.parse_args()

    work = Path(args.work_dir)
    base = work / "base"
    overrides = [f"ppo.steps={args.steps}", *args.overrides]
    cfg = load_config(args.config, ["stages=[sft,dpo,rm,eval]", "eval.models=[sft,dpo]", *overrides])
    summary = run_job(cfg, base)
    references = {name: summary["eval"]["policies"][name]["gt_reward"] for name in ("sft", "dpo")}

    curves: dict[str, list[list[float]]] = {m: [] for m in args.modes}
    finals: dict[str, list[float]] = {m: [] for m in args.modes}
    seconds: dict[str, list[float]] = {m: [] for m in args.modes}
    for seed in args.seeds:
        for mode in args.modes:
            run_dir = work / f"{mode}-seed{seed}"
            if not (run_dir / "stages" / "ppo").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                (run_dir / "stages").mkdir(parents=True)
                shutil.copytree(base / "prepared", run_dir / "prepared")
                for stage in ("sft", "dpo", "rm"):
                    shutil.copytree(base / "stages" / stage, run_dir / "stages" / stage)
            cfg = load_config(
                args.config,
                ["stages=[ppo,eval]", "eval.models=[ppo]", *ARMS[mode], f"seed={seed}", *overrides],
            )
            started = time.perf_counter()
            result = run_job(cfg, run_dir)
            seconds[mode].append(time.perf_counter() - started)
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            gt = [r["gt_reward"] for r in rows if r.get("stage") == "ppo"]
            curves[mode].append(gt)
            finals[mode].append(result["eval"]["policies"]["ppo"]["gt_reward"])
            print(f"seed {seed} {mode}: held-out gt {finals[mode][-1]:.3f}", flush=True)

    rollouts_per_step = cfg.ppo.rollout_batch_size * cfg.ppo.samples_per_prompt
    mean_curves = {m: [statistics.fmean(step) for step in zip(*curves[m], strict=True)] for m in args.modes}
    smoothed = {m: smooth(c, args.smooth) for m, c in mean_curves.items()}
    results = {
        "rollouts_per_step": rollouts_per_step,
        "reference_heldout_gt": references,
        "curves": {
            m: {"per_seed": curves[m], "mean": mean_curves[m], "smoothed_mean": smoothed[m]}
            for m in args.modes
        },
        "heldout_gt": {
            m: {
                "per_seed": finals[m],
                "mean": statistics.fmean(finals[m]),
                "std": statistics.pstdev(finals[m]),
                "se": statistics.stdev(finals[m]) / len(finals[m]) ** 0.5 if len(finals[m]) > 1 else None,
                "ppo_eval_seconds_per_seed": seconds[m],
            }
            for m in args.modes
        },
    }
    if {"rto", "ppo"} <= set(args.modes):
        target = smoothed["ppo"][-1]
        reached = next((i for i, v in enumerate(smoothed["rto"]) if v >= target), None)
        results["ppo_final_training_gt"] = target
        results["rto_steps_to_reach_ppo_final"] = None if reached is None else reached + 1
        results["rto_rollout_fraction_to_reach_ppo_final"] = (
            None if reached is None else (reached + 1) / len(smoothed["ppo"])
        )
        results["rto_final_minus_ppo_final_heldout"] = (
            results["heldout_gt"]["rto"]["mean"] - results["heldout_gt"]["ppo"]["mean"]
        )
    settings = {
        "config": args.config,
        "seeds": args.seeds,
        "steps": args.steps,
        "overrides": overrides,
        "smooth": args.smooth,
    }
    out = write_results(args.name, settings, results)
    plot(results, args.modes, RESULTS / f"{args.name}.png")

    print(f"\n{'policy':<8} {'held-out gt (mean ± std over seeds)':>36}")
    for name, value in references.items():
        print(f"{name:<8} {value:>36.3f}")
    for m in args.modes:
        h = results["heldout_gt"][m]
        print(f"{m:<8} {h['mean']:>28.3f} ± {h['std']:.3f}")
    if "rto_rollout_fraction_to_reach_ppo_final" in results:
        print(
            f"RTO reaches PPO's final training reward after {results['rto_rollout_fraction_to_reach_ppo_final']} of PPO's rollouts"
        )
    print(f"wrote {out}")


def plot(results: dict, modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    per_step = results["rollouts_per_step"]
    colors = {"rto": "tab:red", "ppo": "tab:blue", "dpo": "tab:green"}
    for m in modes:
        runs = results["curves"][m]["per_seed"]
        mean = results["curves"][m]["smoothed_mean"]
        x = [(i + 1) * per_step for i in range(len(mean))]
        spread = [statistics.pstdev(step) for step in zip(*runs, strict=True)]
        ax.plot(x, mean, label=f"{m.upper()} (mean of {len(runs)} seeds)", color=colors.get(m))
        ax.fill_between(
            x,
            [a - s for a, s in zip(mean, spread, strict=True)],
            [a + s for a, s in zip(mean, spread, strict=True)],
            color=colors.get(m),
            alpha=0.15,
        )
    for name, value in results["reference_heldout_gt"].items():
        ax.axhline(
            value, linestyle="--", color=colors.get(name, "gray"), label=f"{name.upper()} policy (held-out)"
        )
    ax.set_xlabel("rollouts")
    ax.set_ylabel("ground-truth reward")
    ax.set_title("Built-in text task: RTO vs sentence-level PPO vs DPO")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
