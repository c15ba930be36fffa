"""Samples/s of one PPO iteration (rto, on Ray) against TRL's GRPOTrainer, same run.

    python benchmarks/throughput.py --iterations 8 --batch 64 --max-new-tokens 48

Both start from the same policy folder (the quickstart's tiny Llama), the same prompts, the same
number of samples per iteration and the same generation length limit, and take one optimizer step
per iteration. rto does more per iteration: a critic forward/backward and three frozen scorers
(reference, DPO model, reward model) besides the policy; GRPO has a reference model (beta > 0) and
a Python reward function (the task's ground truth). Iteration time is wall-clock, after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def rto_iterations(cfg, work: Path, prepared, iterations: int) -> dict:
    from pipelines.prompts import TextPrompts
    from rto.models import load_tokenizer
    from rto.ppo.groups import ModelPaths
    from rto.ppo.trainer import PPOInputs, run_ppo
    from rto.rundir import RunDir

    run = RunDir(work / "rto").create()
    policy = prepared.model("policy")
    rm = prepared.model("reward_model")
    paths = ModelPaths(policy=policy, critic=rm, ref=policy, dpo=policy, rm=rm)
    tokenizer = load_tokenizer(policy)
    started = time.perf_counter()
    run_ppo(
        PPOInputs(
            cfg=cfg,
            run=run,
            out_dir=work / "rto-out",
            paths=paths,
            prompts=TextPrompts(tokenizer, prepared.records("prompts")),
            tokenizer=tokenizer,
            processing_class=tokenizer,
            ground_truth=prepared.ground_truth(),
            rm_normalization=(0.0, 1.0),
            stage_hash="throughput",
            resume=False,
        )  # fmt: skip
    )
    total = time.perf_counter() - started
    rows = run.read_metrics("ppo")
    return {
        "iteration_seconds": [r["time_step"] for r in rows],
        "phase_seconds": {
            k: [r[k] for r in rows] for k in ("time_generate", "time_score", "time_train", "time_sync")
        },
        "response_length": [r["response_length"] for r in rows],
        "wall_seconds_including_startup": total,
    }


class StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer.start)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "completions/mean_length" in logs:
                    timer.lengths.append(logs["completions/mean_length"])

        self.seconds: list[float] = []
        self.lengths: list[float] = []
        self.callback = Callback()


def trl_iterations(
    cfg, work: Path, prepared, iterations: int, batch: int, generations: int, threads: int
) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rto.generation import prompt_text
    from rto.models import load_tokenizer

    torch.set_num_threads(threads)
    policy = prepared.model("policy")
    tokenizer = load_tokenizer(policy)
    gt = prepared.ground_truth()

    def ground_truth(prompts, completions, **kwargs):
        return [
            gt(prompt_text(p), c[-1]["content"] if isinstance(c, list) else c)
            for p, c in zip(prompts, completions, strict=True)
        ]

    prompts = [{"prompt": r["prompt"]} for r in prepared.records("prompts")]
    timer = StepTimer()
    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=batch, num_generations=generations,
        max_completion_length=cfg.ppo.max_new_tokens, max_steps=iterations, learning_rate=cfg.ppo.actor_lr,
        beta=0.04, temperature=cfg.ppo.temperature, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, steps_per_generation=1, num_iterations=1, seed=cfg.seed,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=policy, reward_funcs=ground_truth, args=args, train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer, callbacks=[timer.callback],
    )  # fmt: skip
    trainer.train()
    return {"iteration_seconds": timer.seconds, "response_length": timer.lengths, "torch_threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(QUICKSTART))
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out of the figures")
    parser.add_argument("--batch", type=int, default=64, help="samples per iteration")
    parser.add_argument("--generations", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--trl-threads", type=int, default=2, help="torch threads of the single TRL process")
    args = parser.parse_args()

    from pipelines.prepare import prepare
    from rto.config import load_config
    from rto.rundir import RunDir

    overrides = [
        f"ppo.steps={args.iterations}", f"ppo.rollout_batch_size={args.batch}", f"ppo.train_batch_size={args.batch}",
        f"ppo.micro_batch_size={args.batch}", f"ppo.max_new_tokens={args.max_new_tokens}", "ppo.checkpoint_every=1000",
        "ppo.tensorboard=false",
    ]  # fmt: skip
    cfg = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare(cfg, RunDir(work / "base").create())
        ours = rto_iterations(cfg, work, prepared, args.iterations)
        trl = trl_iterations(
            cfg, work, prepared, args.iterations, args.batch, args.generations, args.trl_threads
        )

    def rate(seconds: list[float]) -> float:
        return args.batch / statistics.median(seconds[args.warmup :])

    results = {
        "rto_samples_per_s": rate(ours["iteration_seconds"]),
        "trl_grpo_samples_per_s": rate(trl["iteration_seconds"]),
        "rto": ours,
        "trl_grpo": trl,
    }
    results["ratio_rto_over_trl"] = results["rto_samples_per_s"] / results["trl_grpo_samples_per_s"]
    results["rto_phase_median_seconds"] = {
        k: statistics.median(v[args.warmup :]) for k, v in ours["phase_seconds"].items()
    }
    out = write_results("throughput", vars(args), results)
    print(f"{'':<10} {'samples/s':>10} {'s/iteration':>12} {'mean length':>12}")
    for name, key in (("rto", "rto"), ("TRL GRPO", "trl_grpo")):
        r = results[key]
        sec = statistics.median(r["iteration_seconds"][args.warmup :])
        length = statistics.fmean(r["response_length"]) if r["response_length"] else float("nan")
        print(f"{name:<10} {args.batch / sec:>10.1f} {sec:>12.2f} {length:>12.1f}")
    print(
        f"ratio rto / TRL GRPO: {results['ratio_rto_over_trl']:.2f}x   (phases: {results['rto_phase_median_seconds']})"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
