"""The same PPO job with dense rollouts and with pruned rollouts, same seeds, same steps.

    python benchmarks/pruned_ppo.py --task text --seeds 0 1 2 --steps 20     # FTP on long prompts
    python benchmarks/pruned_ppo.py --task image --seeds 0 1 2 --jobs 2        # AdaptInfer on pictures
    python benchmarks/pruned_ppo.py --task image_careless --seeds 0 1 2 --jobs 2 --steps 30 --set ppo.actor_lr=2e-4 --set dpo.lr=5e-4
    python benchmarks/pruned_ppo.py --task image_quickstart --seeds 0 1 2 --jobs 2
    python benchmarks/pruned_ppo.py --task image_quickstart_careless --seeds 0 1 2 --jobs 2 --steps 40

**text**: the facts variant's 12-layer recipe (`configs/facts.yaml`: prompts of about 290 tokens:
the attributes of 56 subjects, then a request about one of them). Arms `dense` and `ftp`
(`ppo.rollout_pruner: none` / `ftp`); the SFT model and the FTP router (`ftp` stage) are trained
once and cached (`--base`, default ~/.cache/rto/facts-12l-v1). Held-out figure: ground truth at
temperature 0.7.

**image**: ground-truth PPO from the benchmark VLM (`benchmarks/configs/image-ppo.yaml`; the model
is `pipelines.tasks.image_model.sft_recipe`'s, built into ~/.cache/rto/image-vlm-v4 first when it is
missing: about 80 minutes). Arms `image_dense` and `image_adaptinfer` (25 % of the vision tokens);
the start policy is the `base` row of the cached eval (~/.cache/rto/image-vlm-v4-ppo).

**image_careless**: the same job from a VLM that can see but was taught by a careless annotator
(`image_model.CARELESS_PHASES`: the recipe's first two phases with 60 % of the colour, shape and
count answers "red" / "nothing" / "zero"; built into ~/.cache/rto/image-vlm-careless-v2 when missing,
about 50 minutes), with a `dpo` stage on the task's right-vs-wrong pairs trained once into the cached base.
Arms `careless_dense` and `careless_adaptinfer` (ground truth + KL, as `image`) and `careless_rto`
(dense rollouts, RTO's token reward from that DPO model).

**image_quickstart**: the image quickstart (`configs/image-quickstart.yaml`: the tiny LLaVA, RTO's
token reward from its DPO stage) with a truthful SFT set (`task.sft_careless=0`). Arms `quickstart_dense` and `quickstart_adaptinfer`, the job as
configured, and `quickstart_ppo`: dense rollouts with the ground truth alone as the reward
(`reward.mode: ppo`), to tell what RTO's DPO term adds. The SFT and DPO models are cached
(default ~/.cache/rto/image-quickstart-v2).

**image_quickstart_careless**: the same three arms (`careless_quickstart_dense`, `..._adaptinfer`,
`..._ppo`) from the quickstart's SFT trained on a careless annotator's answers, as the quickstart
is configured (`task.sft_careless=0.6`: 60 % of the colour, shape and count questions answered "red", "nothing",
"zero" without looking), so that the start policy makes mistakes the reward can fix. SFT and DPO
cached in ~/.cache/rto/image-quickstart-careless-v1.

Image held-out figure: greedy accuracy on the task's evaluation questions (`task.n_eval`).

For each seed the `ppo` stage runs once per arm, interleaved (every arm once per seed, in turn, so
that all see the machine in the same state), from the same cached models, and the `eval` stage
scores each trained policy. A task's run replaces its own arms in the results file and keeps the
other task's.

Per arm (JSON `results.arms.<arm>`): final held-out figure (mean and standard error over seeds),
the seconds of the rollout phase and of the whole step (means over steps and seeds), the rollout
phase's share of a step, the mean importance weight, the share of tokens at the cap and the
sampler-vs-dense KL per step, and the curves of training ground truth against cumulative rollout
seconds and cumulative total seconds (PNG). For the text task FLOPs of the pruned rollouts against
dense ones are computed from the router's schedule at the mean prompt and response lengths. Times
are CPU seconds of wall clock on this machine: ratios between arms of the same run, not absolute
figures.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402

from pipelines.runner import run_job  # noqa: E402
from prune.flops import token_sparsity_rollout_flops  # noqa: E402
from rto.config import load_config  # noqa: E402
from rto.rundir import RunDir  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BENCH_CONFIGS = Path(__file__).resolve().parent / "configs"
CACHE = Path.home() / ".cache" / "rto"


@dataclass(frozen=True)
class Setup:
    """One task's comparison: its job file, the stages trained once into the cached base, the
    arms (name -> config overrides), which arm is the baseline and which the pruned one, the eval
    name of the start policy, the RTO and sentence-level PPO arms (where both run), and a policy
    folder to build first when it is missing."""

    config: Path
    base: Path
    base_stages: tuple[str, ...]
    arms: dict[str, list[str]]
    baseline: str
    pruned: str
    start: str = "sft"
    rto: str | None = None
    ppo: str | None = None
    policy: Path | None = None
    careless: bool = False  # build `policy` with image_model.CARELESS_PHASES instead of PHASES
    overrides: tuple[str, ...] = ()  # config overrides of this setup, for the base and every arm


SETUPS = {
    "text": Setup(
        config=CONFIGS / "facts.yaml",
        base=CACHE / "facts-12l-v1",
        base_stages=("sft", "ftp"),
        arms={"dense": ["ppo.rollout_pruner=none"], "ftp": ["ppo.rollout_pruner=ftp"]},
        baseline="dense",
        pruned="ftp",
    ),
    "image": Setup(
        config=BENCH_CONFIGS / "image-ppo.yaml",
        base=CACHE / "image-vlm-v4-ppo",
        base_stages=(),
        arms={
            "image_dense": ["ppo.rollout_pruner=none"],
            "image_adaptinfer": ["ppo.rollout_pruner=adaptinfer"],
        },
        baseline="image_dense",
        pruned="image_adaptinfer",
        start="base",
        policy=CACHE / "image-vlm-v4",
    ),
    "image_careless": Setup(
        config=BENCH_CONFIGS / "image-ppo.yaml",
        base=CACHE / "image-vlm-careless-v2-ppo",
        base_stages=("dpo",),
        arms={
            "careless_dense": ["ppo.rollout_pruner=none"],
            "careless_adaptinfer": ["ppo.rollout_pruner=adaptinfer"],
            "careless_rto": ["ppo.rollout_pruner=none", "reward.mode=rto"],
        },
        baseline="careless_dense",
        pruned="careless_adaptinfer",
        start="base",
        rto="careless_rto",
        ppo="careless_dense",
        policy=CACHE / "image-vlm-careless-v2",
        careless=True,
    ),
    "image_quickstart": Setup(
        config=CONFIGS / "image-quickstart.yaml",
        base=CACHE / "image-quickstart-v2",
        base_stages=("sft", "dpo"),
        arms={
            "quickstart_dense": ["ppo.rollout_pruner=none"],
            "quickstart_adaptinfer": ["ppo.rollout_pruner=adaptinfer"],
            "quickstart_ppo": ["ppo.rollout_pruner=none", "reward.mode=ppo"],
        },
        baseline="quickstart_dense",
        pruned="quickstart_adaptinfer",
        rto="quickstart_dense",
        ppo="quickstart_ppo",
        overrides=("task.sft_careless=0",),  # the SFT set as the task states it
    ),
    "image_quickstart_careless": Setup(
        config=CONFIGS / "image-quickstart.yaml",
        base=CACHE / "image-quickstart-careless-v1",
        base_stages=("sft", "dpo"),
        arms={
            "careless_quickstart_dense": ["ppo.rollout_pruner=none"],
            "careless_quickstart_adaptinfer": ["ppo.rollout_pruner=adaptinfer"],
            "careless_quickstart_ppo": ["ppo.rollout_pruner=none", "reward.mode=ppo"],
        },
        baseline="careless_quickstart_dense",
        pruned="careless_quickstart_adaptinfer",
        rto="careless_quickstart_dense",
        ppo="careless_quickstart_ppo",
        overrides=("task.sft_careless=0.6",),
    ),
}
PER_STEP = ("gt_reward", "time_generate", "time_score", "time_train", "time_step", "response_length",
            "is_weight_mean", "is_capped_frac", "sampler_kl", "dpo_gt_auc", "dense_fallback")  # fmt: skip


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


def prepare_base(setup: Setup, base: Path, overrides: list[str]) -> dict:
    """The stages every arm starts from (cached: run_job skips the stages that are up to date)."""
    if setup.policy is not None and not (setup.policy / "config.json").exists():
        from pipelines.tasks import image_model

        print(f"training the benchmark VLM into {setup.policy} (image_model.sft_recipe)...", flush=True)
        image_model.sft_recipe(setup.policy, phases=image_model.CARELESS_PHASES if setup.careless else None)
    return run_job(base_config(setup, overrides), base)


def setup_config(setup: Setup, stages: list[str], extra: list[str]):
    """The setup's job file with `stages`, its start policy and overrides, then `extra`."""
    policy = [f"policy.path={setup.policy}"] if setup.policy is not None else []
    return load_config(setup.config, [f"stages=[{','.join(stages)}]", *policy, *setup.overrides, *extra])


def base_config(setup: Setup, overrides: list[str]):
    """The job of the base stages and the start policy's evaluation."""
    return setup_config(setup, [*setup.base_stages, "eval"], [f"eval.models=[{setup.start}]", *overrides])


def arm_config(setup: Setup, arm: str, seed: int, overrides: list[str]):
    """The job of one arm: the base stages (up to date in its run directory: skipped), ppo, eval.
    The seed is the ppo stage's (`ppo.seed`): the job's `seed` is in every stage's cache key, so
    setting it would train the base stages again, from another start, in every arm."""
    extra = ["eval.models=[ppo]", *setup.arms[arm], f"ppo.seed={seed}", *overrides]
    return setup_config(setup, [*setup.base_stages, "ppo", "eval"], extra)


def arm_run(setup: Setup, base: Path, run_dir: Path, arm: str, seed: int, overrides: list[str]) -> dict:
    if not (run_dir / "stages" / "eval").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        (run_dir / "stages").mkdir(parents=True)
        shutil.copytree(base / "prepared", run_dir / "prepared")
        for stage in setup.base_stages:
            shutil.copytree(base / "stages" / stage, run_dir / "stages" / stage)
    cfg = arm_config(setup, arm, seed, overrides)
    summary = run_job(cfg, run_dir)
    rows = RunDir(run_dir).read_metrics("ppo")
    return {
        "seed": seed,
        "heldout_by_kind": accuracy_by_kind(run_dir / "stages" / "eval" / "samples-ppo.jsonl"),
        "heldout_gt": summary["eval"]["policies"]["ppo"]["gt_reward"],
        "heldout_samples": summary["eval"]["policies"]["ppo"].get("samples"),
        "steps": {key: [r.get(key) for r in rows] for key in PER_STEP},
    }


def accuracy_by_kind(samples: Path) -> dict[str, float] | None:
    """Held-out ground truth per question kind of the image task (None for the text task)."""
    from pipelines.tasks import image as task

    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    if not rows or not rows[0]["prompt"].startswith("["):
        return None
    kinds: dict[str, list[float]] = {}
    for row in rows:
        kinds.setdefault(task.question_kind(row["prompt"].split("] ", 1)[1]), []).append(row["gt_reward"])
    return {kind: statistics.fmean(values) for kind, values in sorted(kinds.items())}


def summarise(runs: list[dict]) -> dict:
    final_mean, final_se = mean_se([r["heldout_gt"] for r in runs])
    every = lambda key: [v for r in runs for v in r["steps"][key] if v is not None]  # noqa: E731
    rollout, step = statistics.fmean(every("time_generate")), statistics.fmean(every("time_step"))
    arm = {
        "final_gt_mean": final_mean,
        "final_gt_se": final_se,
        "final_gt_per_seed": [r["heldout_gt"] for r in runs],
        **(
            {
                "final_by_kind_mean": {
                    k: statistics.fmean(r["heldout_by_kind"][k] for r in runs) for k in kinds
                }
            }
            if (kinds := runs[0].get("heldout_by_kind"))
            else {}
        ),
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
    for key in ("is_weight_mean", "is_capped_frac", "sampler_kl", "dpo_gt_auc", "dense_fallback"):
        values = every(key)
        if values:
            arm[f"{key}_mean"] = statistics.fmean(values)
            arm[f"{key}_per_step"] = [
                statistics.fmean(x for x in v if x is not None)
                for v in zip(*(r["steps"][key] for r in runs), strict=True)
                if any(x is not None for x in v)
            ]
    return arm


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


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


def text_results(setup: Setup, base: Path, work: Path, arms: dict, start_gt: float, seeds: list[int]) -> dict:
    dense, ftp = arms["dense"], arms["ftp"]
    prompt_tokens = prompt_length(RunDir(work / f"ftp-seed{seeds[0]}"))
    response_tokens = round(dense["response_length_mean"])
    return {
        "start_policy_heldout_gt": start_gt,
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


def image_results(arms: dict, start: float, n_eval: int, setup: Setup | None = None) -> dict:
    """Gains over the start policy and between arms, each with its standard error: over seeds for
    a trained arm, binomial over the `n_eval` questions for the start policy (one model). RTO
    against sentence-level PPO only where the setup runs both (else None)."""
    setup = setup or SETUPS["image_quickstart"]
    dense, pruned = arms[setup.baseline], arms[setup.pruned]
    start_se = binomial_se(start, n_eval)

    def gain(arm: dict) -> dict:
        se = math.hypot(arm["final_gt_se"], start_se)
        return {"gain": arm["final_gt_mean"] - start, "se": se}

    def difference(a: dict, b: dict) -> dict:
        return {
            "difference": a["final_gt_mean"] - b["final_gt_mean"],
            "se": math.hypot(a["final_gt_se"], b["final_gt_se"]),
        }

    gains = {name: gain(arm) for name, arm in arms.items()}
    rto_vs_ppo = difference(arms[setup.rto], arms[setup.ppo]) if setup.rto and setup.ppo else None
    pruned_vs_dense = difference(pruned, dense)
    rollout_ratio = pruned["rollout_seconds_mean"] / dense["rollout_seconds_mean"]
    return {
        "start_policy_heldout_gt": start,
        "start_policy_heldout_se": start_se,
        "heldout_questions": n_eval,
        "gains_over_start": gains,
        "rto_minus_ppo": rto_vs_ppo,
        "adaptinfer_minus_dense": pruned_vs_dense,
        "ratios": {
            "rollout_seconds_adaptinfer_over_dense": rollout_ratio,
            "step_seconds_adaptinfer_over_dense": pruned["step_seconds_mean"] / dense["step_seconds_mean"],
        },
        "goals": {
            "dense_ppo_beats_start_by_2se": gains[setup.baseline]["gain"] > 2 * gains[setup.baseline]["se"],
            "rto_at_least_level_with_ppo": None
            if rto_vs_ppo is None
            else rto_vs_ppo["difference"] >= -rto_vs_ppo["se"],
            "adaptinfer_within_1se_of_dense": abs(pruned_vs_dense["difference"]) <= pruned_vs_dense["se"],
            "rollout_time_at_most_0.6x_dense": rollout_ratio <= 0.6,
        },
    }


def merge_previous(path: Path, task: str, arms: dict, section: dict, settings: dict) -> tuple[dict, dict]:
    """The results file with this task's arms and section replaced and the other task's kept (a
    file from before the image arms keeps its text figures at the top level: moved under `text`)."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    results, all_settings = previous.get("results", {}), previous.get("settings", {})
    if results and "text" not in results and "start_policy_heldout_gt" in results:
        results = {"arms": results["arms"], "text": {k: v for k, v in results.items() if k != "arms"}}
        all_settings = {"text": all_settings}
    own = set(SETUPS[task].arms)
    results["arms"] = {**{k: v for k, v in results.get("arms", {}).items() if k not in own}, **arms}
    results[task] = section
    all_settings[task] = settings
    return results, all_settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(SETUPS), default="text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="ppo.steps (default: the job file's)")
    parser.add_argument("--base", default=None, help="run directory of the cached base models")
    parser.add_argument("--work-dir", default=None, help="default runs/bench-pruned-ppo[-image]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--name", default="pruned_ppo")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each with its own Ray (2 on a 2-core machine: "
        "every arm then shares the machine with another, the same for all arms)",
    )  # fmt: skip
    args = parser.parse_args()

    setup = SETUPS[args.task]
    base = Path(args.base).expanduser() if args.base else setup.base
    work = Path(args.work_dir or ("runs/bench-pruned-ppo" + ("" if args.task == "text" else f"-{args.task}")))
    overrides = [*([f"ppo.steps={args.steps}"] if args.steps else []), *args.overrides]
    base_summary = prepare_base(setup, base, args.overrides)
    start = base_summary["eval"]["policies"][setup.start]
    start_by_kind = accuracy_by_kind(base / "stages" / "eval" / f"samples-{setup.start}.jsonl")
    print(
        f"start policy ({setup.start}): held-out ground truth {start['gt_reward']:.3f} ({start.get('samples')} prompts)",
        flush=True,
    )

    runs: dict[str, list[dict]] = {arm: [] for arm in setup.arms}
    order = [(seed, arm) for seed in args.seeds for arm in setup.arms]  # interleaved
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(arm_run, setup, base, work / f"{arm}-seed{seed}", arm, seed, overrides)
            for seed, arm in order
        ]
        for (seed, arm), future in zip(order, futures, strict=True):
            result = future.result()
            runs[arm].append(result)
            print(
                f"seed {seed} {arm:<16}: held-out gt {result['heldout_gt']:.3f}, rollout "
                f"{statistics.fmean(result['steps']['time_generate']):.2f} s / step "
                f"{statistics.fmean(result['steps']['time_step']):.2f} s",
                flush=True,
            )

    arms = {arm: summarise(r) for arm, r in runs.items()}
    if args.task == "text":
        section = text_results(setup, base, work, arms, start["gt_reward"], args.seeds)
    else:
        section = image_results(arms, start["gt_reward"], int(start["samples"]), setup)
        section["start_policy_by_kind"] = start_by_kind
    settings = {"config": str(setup.config), "seeds": args.seeds, "steps": args.steps, "overrides": overrides,
                "base": str(base), "jobs": args.jobs}  # fmt: skip
    results, all_settings = merge_previous(RESULTS / f"{args.name}.json", args.task, arms, section, settings)
    out = write_results(args.name, all_settings, results)
    plot(
        results,
        args.task,
        RESULTS / (f"{args.name}.png" if args.task == "text" else f"{args.name}_{args.task}.png"),
    )
    print()
    print(table(results, args.task))
    print(f"wrote {out}")


def prompt_length(run: RunDir) -> int:
    """Mean prompt tokens of the PPO prompts (with the policy's chat template)."""
    from rto.generation import encode_prompt
    from rto.models import load_tokenizer

    tokenizer = load_tokenizer(str(run.root / "stages" / "sft"))
    (prompts,) = (run.root / "prepared").glob("*/prompts.jsonl")
    records = [json.loads(x) for x in prompts.read_text().splitlines()[:256]]
    return round(statistics.fmean(len(encode_prompt(tokenizer, r["prompt"])) for r in records))


def table(results: dict, task: str) -> str:
    section = results[task]
    arms = {name: results["arms"][name] for name in SETUPS[task].arms}
    lines = [
        "| rollouts | final held-out GT (± s.e.) | per seed | rollout s / step | step s / step | rollout share "
        "| IS weight | at cap | sampler KL | dense-fallback steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        per_seed = ", ".join(f"{v:.3f}" for v in arm["final_gt_per_seed"])
        extra = (
            f"{arm['is_weight_mean_mean']:.3f} | {arm['is_capped_frac_mean']:.3f} | {arm['sampler_kl_mean']:.4f}"
            if "is_weight_mean_mean" in arm
            else "– | – | –"
        )
        extra += f" | {arm['dense_fallback_mean']:.0%}" if "dense_fallback_mean" in arm else " | –"
        lines.append(
            f"| {name} | {arm['final_gt_mean']:.3f} ± {arm['final_gt_se']:.3f} | {per_seed} | "
            f"{arm['rollout_seconds_mean']:.2f} | {arm['step_seconds_mean']:.2f} | {arm['rollout_share_of_step']:.0%} | "
            f"{extra} |"
        )
    ratios = section["ratios"]
    lines.append("")
    if task == "text":
        flops = section["flops"]
        lines += [
            f"start (SFT) held-out GT {section['start_policy_heldout_gt']:.3f}; FTP / dense: rollout time "
            f"{ratios['rollout_seconds_ftp_over_dense']:.2f}x, step time {ratios['step_seconds_ftp_over_dense']:.2f}x, "
            f"final GT {ratios['final_gt_ftp_over_dense']:.1%}",
            f"FTP rollout FLOPs / dense ({flops['prompt_tokens']}-token prompts, {flops['response_tokens']}-token "
            f"responses, {flops['decode']} decoding): prefill {flops['prefill_ratio']:.2f}, whole rollout "
            f"{flops['rollout_ratio']:.2f} (prefill is {flops['prefill_share_of_dense_rollout']:.0%} of a dense rollout)",
        ]
    else:
        gains = ", ".join(
            f"{name} {g['gain']:+.3f} ± {g['se']:.3f}" for name, g in section["gains_over_start"].items()
        )
        lines += [
            f"start ({SETUPS[task].start}) held-out accuracy {section['start_policy_heldout_gt']:.3f} ± "
            f"{section['start_policy_heldout_se']:.3f} ({section['heldout_questions']} questions); gains: {gains}",
            (
                f"RTO − PPO {section['rto_minus_ppo']['difference']:+.3f} ± {section['rto_minus_ppo']['se']:.3f}; "
                if section["rto_minus_ppo"]
                else ""
            )
            + f"AdaptInfer − dense {section['adaptinfer_minus_dense']['difference']:+.3f} ± "
            f"{section['adaptinfer_minus_dense']['se']:.3f}; AdaptInfer / dense: rollout time "
            f"{ratios['rollout_seconds_adaptinfer_over_dense']:.2f}x, step time "
            f"{ratios['step_seconds_adaptinfer_over_dense']:.2f}x",
        ]
        kinds = section.get("start_policy_by_kind") or {}
        if kinds:
            lines.append(
                "by question kind (start → each arm): "
                + "; ".join(
                    f"{k} {v:.3f} → " + " / ".join(f"{a['final_by_kind_mean'][k]:.3f}" for a in arms.values())
                    for k, v in kinds.items()
                )
            )
        auc = [f"{n} {a['dpo_gt_auc_mean']:.3f}" for n, a in arms.items() if "dpo_gt_auc_mean" in a]
        if auc:
            lines.append("DPO term vs ground truth, AUC over each step's rollouts: " + ", ".join(auc))
    lines.append(
        "goals: "
        + ", ".join(
            f"{k} {'not measured' if v is None else 'met' if v else 'NOT met'}"
            for k, v in section["goals"].items()
        )
    )
    return "\n".join(lines)


def plot(results: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    palette = ["tab:blue", "tab:red", "tab:green"]
    arms = {name: results["arms"][name] for name in SETUPS[task].arms}
    for ax, key, label in zip(
        axes,
        ("cumulative_rollout_seconds", "cumulative_total_seconds"),
        ("cumulative rollout-phase seconds", "cumulative PPO seconds"),
        strict=True,
    ):
        for color, (name, arm) in zip(palette, arms.items()):  # noqa: B905
            for i, curve in enumerate(arm["curves"]):
                ax.plot(
                    curve[key], curve["gt_reward"], color=color, alpha=0.35 + 0.65 * (i == 0),
                    label=name if i == 0 else None,
                )  # fmt: skip
        ax.axhline(
            results[task]["start_policy_heldout_gt"],
            linestyle="--",
            color="gray",
            label=f"start policy, {SETUPS[task].start} (held-out)",
        )
        ax.set_xlabel(label + " (CPU)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training ground truth per step")
    axes[0].legend(loc="lower right", fontsize=8)
    title = {
        "text": "PPO on the facts task (12-layer policy): dense vs FTP-pruned rollouts",
        "image": "PPO (ground truth) on the image task from the benchmark VLM: dense vs AdaptInfer rollouts (25 %)",
        "image_careless": "PPO (ground truth) from a VLM taught by a careless annotator: dense vs AdaptInfer "
        "rollouts (25 %)",
        "image_quickstart": "PPO on the image task (quickstart's SFT LLaVA): dense vs AdaptInfer rollouts (25 %), "
        "and PPO without the DPO term",
        "image_quickstart_careless": "RTO and PPO from the quickstart's LLaVA taught by a careless annotator "
        "(sft_careless 0.6): dense vs AdaptInfer rollouts (25 %)",
    }[task]
    fig.suptitle(title + ", one line per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
