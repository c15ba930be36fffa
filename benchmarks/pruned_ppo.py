"""The same PPO job with dense rollouts and with FTP-pruned rollouts, same seeds, same steps.

    python benchmarks/pruned_ppo.py --seeds 0 1 2 --steps 20

The policy is the facts variant's 12-layer recipe (`configs/facts.yaml`: prompts of about 290
tokens: the attributes of 56 subjects, then a request about one of them). Its SFT model and the FTP router
(`ftp` stage) are trained once and cached (`--base`, default ~/.cache/rto/facts-12l-v1; delete it to
retrain); then for each seed the `ppo` stage runs with `ppo.rollout_pruner: none` and `ftp`,
interleaved (dense, ftp, dense, ftp, ...), from the same SFT policy, and the `eval` stage scores
each trained policy on held-out prompts (dense generation, temperature 0.7).

Per arm (JSON `results.arms.dense` / `results.arms.ftp`): final held-out ground truth (mean and
standard error over seeds), the seconds of the rollout phase and of the whole step (means over
steps and seeds), the rollout phase's share of a step, the mean importance weight, the share of
tokens at the cap and the sampler-vs-dense KL per step, and the curves of training ground truth
against cumulative rollout seconds and cumulative total seconds (PNG). FLOPs of the pruned
rollouts against dense ones are computed from the router's schedule at the mean prompt and response
lengths, for the prefill and for the whole rollout. Times are CPU seconds of wall clock on this
machine: ratios between arms of the same run, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402

from pipelines.runner import run_job  # noqa: E402
from prune.flops import token_sparsity_rollout_flops  # noqa: E402
from rto.config import load_config  # noqa: E402
from rto.rundir import RunDir  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "facts.yaml"
ARMS = {"dense": "none", "ftp": "ftp"}
PER_STEP = ("gt_reward", "time_generate", "time_score", "time_train", "time_step", "response_length",
            "is_weight_mean", "is_capped_frac", "sampler_kl")  # fmt: skip


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return mean, se


def cumulative(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def prepare_base(config: str, base: Path, overrides: list[str]) -> dict:
    """SFT policy and FTP router (cached: run_job skips the stages that are up to date)."""
    cfg = load_config(config, ["stages=[sft,ftp,eval]", "eval.models=[sft]", *overrides])
    return run_job(cfg, base)


def arm_run(config: str, base: Path, run_dir: Path, arm: str, seed: int, overrides: list[str]) -> dict:
    if not (run_dir / "stages" / "eval").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        (run_dir / "stages").mkdir(parents=True)
        shutil.copytree(base / "prepared", run_dir / "prepared")
        for stage in ("sft", "ftp"):
            shutil.copytree(base / "stages" / stage, run_dir / "stages" / stage)
    cfg = load_config(
        config,
        [
            "stages=[ppo,eval]",
            "eval.models=[ppo]",
            f"ppo.rollout_pruner={ARMS[arm]}",
            f"seed={seed}",
            *overrides,
        ],
    )
    summary = run_job(cfg, run_dir)
    rows = RunDir(run_dir).read_metrics("ppo")
    return {
        "seed": seed,
        "heldout_gt": summary["eval"]["policies"]["ppo"]["gt_reward"],
        "steps": {key: [r.get(key) for r in rows] for key in PER_STEP},
    }


def summarise(runs: list[dict]) -> dict:
    final_mean, final_se = mean_se([r["heldout_gt"] for r in runs])
    every = lambda key: [v for r in runs for v in r["steps"][key] if v is not None]  # noqa: E731
    rollout, step = statistics.fmean(every("time_generate")), statistics.fmean(every("time_step"))
    arm = {
        "final_gt_mean": final_mean,
        "final_gt_se": final_se,
        "final_gt_per_seed": [r["heldout_gt"] for r in runs],
        "seeds": [r["seed"] for r in runs],
        "rollout_seconds_mean": rollout,
        "step_seconds_mean": step,
        "rollout_share_of_step": rollout / step,
        "score_seconds_mean": statistics.fmean(every("time_score")),
        "train_seconds_mean": statistics.fmean(every("time_train")),
        "response_length_mean": statistics.fmean(every("response_length")),
        "curves": [
            {
                "seed": r["seed"],
                "gt_reward": r["steps"]["gt_reward"],
                "cumulative_rollout_seconds": cumulative(r["steps"]["time_generate"]),
                "cumulative_total_seconds": cumulative(r["steps"]["time_step"]),
            }
            for r in runs
        ],
    }
    for key in ("is_weight_mean", "is_capped_frac", "sampler_kl"):
        values = every(key)
        if values:
            arm[f"{key}_mean"] = statistics.fmean(values)
            arm[f"{key}_per_step"] = [
                statistics.fmean(v) for v in zip(*(r["steps"][key] for r in runs), strict=True)
            ]
    return arm


def rollout_flops(base: Path, prompt_tokens: int, new_tokens: int) -> dict:
    """Analytic decoder FLOPs of one FTP rollout against a dense one (prefill, and whole rollout)."""
    from transformers import AutoConfig

    meta = json.loads((base / "stages" / "ftp" / "ftp.json").read_text())
    config = AutoConfig.from_pretrained(base / "stages" / "sft")
    schedule = meta["schedule"]
    threshold = meta.get("decode_thresholds", meta.get("decode_threshold", 0.0))
    dense_decode = not isinstance(threshold, list) and float(threshold) <= 0
    dense = token_sparsity_rollout_flops(config, prompt_tokens, new_tokens, [0.0] * len(schedule))
    # decode: dense when the threshold is 0; else each block at about its target sparsity
    keep = None if dense_decode else [1.0 - s for s in schedule]
    pruned = token_sparsity_rollout_flops(config, prompt_tokens, new_tokens, schedule, keep)
    return {
        "schedule": schedule,
        "decode": "dense" if dense_decode else "pruned",
        "prompt_tokens": prompt_tokens,
        "response_tokens": new_tokens,
        "prefill_ratio": pruned[0] / dense[0],
        "rollout_ratio": sum(pruned) / sum(dense),
        "prefill_share_of_dense_rollout": dense[0] / sum(dense),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--base", default=str(Path.home() / ".cache" / "rto" / "facts-12l-v1"),
                        help="run directory of the cached SFT policy and FTP router")  # fmt: skip
    parser.add_argument("--work-dir", default="runs/bench-pruned-ppo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--name", default="pruned_ppo")
    args = parser.parse_args()

    base, work = Path(args.base).expanduser(), Path(args.work_dir)
    overrides = [f"ppo.steps={args.steps}", *args.overrides]
    base_summary = prepare_base(args.config, base, args.overrides)
    start_gt = base_summary["eval"]["policies"]["sft"]["gt_reward"]
    print(f"SFT policy: held-out ground truth {start_gt:.3f}", flush=True)

    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:  # interleaved: both arms see the machine in the same state
            result = arm_run(args.config, base, work / f"{arm}-seed{seed}", arm, seed, overrides)
            runs[arm].append(result)
            print(
                f"seed {seed} {arm:<5}: held-out gt {result['heldout_gt']:.3f}, rollout "
                f"{statistics.fmean(result['steps']['time_generate']):.2f} s / step "
                f"{statistics.fmean(result['steps']['time_step']):.2f} s",
                flush=True,
            )

    arms = {arm: summarise(r) for arm, r in runs.items()}
    prompts = RunDir(work / f"ftp-seed{args.seeds[0]}")
    prompt_tokens = prompt_length(prompts)
    response_tokens = round(arms["dense"]["response_length_mean"])
    dense, ftp = arms["dense"], arms["ftp"]
    results = {
        "start_policy_heldout_gt": start_gt,
        "arms": arms,
        "ratios": {
            "rollout_seconds_ftp_over_dense": ftp["rollout_seconds_mean"] / dense["rollout_seconds_mean"],
            "step_seconds_ftp_over_dense": ftp["step_seconds_mean"] / dense["step_seconds_mean"],
            "final_gt_ftp_over_dense": ftp["final_gt_mean"] / dense["final_gt_mean"],
            "final_gt_gain_ftp_over_dense_gain": (ftp["final_gt_mean"] - start_gt)
            / (dense["final_gt_mean"] - start_gt)
            if dense["final_gt_mean"] != start_gt
            else None,
        },
        "flops": rollout_flops(base, prompt_tokens, response_tokens),
        "goals": {
            "rollout_time_at_most_0.75x_dense": ftp["rollout_seconds_mean"]
            <= 0.75 * dense["rollout_seconds_mean"],
            "final_gt_at_least_95pct_of_dense": ftp["final_gt_mean"] >= 0.95 * dense["final_gt_mean"],
        },
    }
    settings = {"config": args.config, "seeds": args.seeds, "steps": args.steps, "overrides": overrides,
                "base": str(base)}  # fmt: skip
    out = write_results(args.name, settings, results)
    plot(results, RESULTS / f"{args.name}.png")
    print()
    print(table(results))
    print(f"wrote {out}")


def prompt_length(run: RunDir) -> int:
    """Mean prompt tokens of the PPO prompts (with the policy's chat template)."""
    from rto.generation import encode_prompt
    from rto.models import load_tokenizer

    tokenizer = load_tokenizer(str(run.root / "stages" / "sft"))
    (prompts,) = (run.root / "prepared").glob("*/prompts.jsonl")
    records = [json.loads(x) for x in prompts.read_text().splitlines()[:256]]
    return round(statistics.fmean(len(encode_prompt(tokenizer, r["prompt"])) for r in records))


def table(results: dict) -> str:
    arms, flops = results["arms"], results["flops"]
    lines = [
        "| rollouts | final held-out GT (± s.e.) | per seed | rollout s / step | step s / step | rollout share "
        "| IS weight | at cap | sampler KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        per_seed = ", ".join(f"{v:.3f}" for v in arm["final_gt_per_seed"])
        extra = (
            f"{arm['is_weight_mean_mean']:.3f} | {arm['is_capped_frac_mean']:.3f} | {arm['sampler_kl_mean']:.4f}"
            if "is_weight_mean_mean" in arm
            else "– | – | –"
        )
        lines.append(
            f"| {name} | {arm['final_gt_mean']:.3f} ± {arm['final_gt_se']:.3f} | {per_seed} | "
            f"{arm['rollout_seconds_mean']:.2f} | {arm['step_seconds_mean']:.2f} | {arm['rollout_share_of_step']:.0%} | "
            f"{extra} |"
        )
    ratios = results["ratios"]
    lines += [
        "",
        f"start (SFT) held-out GT {results['start_policy_heldout_gt']:.3f}; FTP / dense: rollout time "
        f"{ratios['rollout_seconds_ftp_over_dense']:.2f}x, step time {ratios['step_seconds_ftp_over_dense']:.2f}x, "
        f"final GT {ratios['final_gt_ftp_over_dense']:.1%}",
        f"FTP rollout FLOPs / dense ({flops['prompt_tokens']}-token prompts, {flops['response_tokens']}-token "
        f"responses, {flops['decode']} decoding): prefill {flops['prefill_ratio']:.2f}, whole rollout "
        f"{flops['rollout_ratio']:.2f} (prefill is {flops['prefill_share_of_dense_rollout']:.0%} of a dense rollout)",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {"dense": "tab:blue", "ftp": "tab:red"}
    for ax, key, label in zip(
        axes,
        ("cumulative_rollout_seconds", "cumulative_total_seconds"),
        ("cumulative rollout-phase seconds", "cumulative PPO seconds"),
        strict=True,
    ):
        for name, arm in results["arms"].items():
            for i, curve in enumerate(arm["curves"]):
                ax.plot(
                    curve[key], curve["gt_reward"], color=colors[name], alpha=0.35 + 0.65 * (i == 0),
                    label=f"{name} rollouts" if i == 0 else None,
                )  # fmt: skip
        ax.axhline(results["start_policy_heldout_gt"], linestyle="--", color="gray", label="SFT (held-out)")
        ax.set_xlabel(label + " (CPU)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training ground truth per step")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("PPO on the facts task (12-layer policy): dense vs FTP-pruned rollouts, one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
