"""What bf16 autocast does to a policy's step on this CPU, against float32 (issue 19's matched compute).

    python benchmarks/precision.py                 # 25.4 M policy, one torch thread, about 4 minutes

TRL's `GRPOConfig` defaults to `bf16=True`, which on a CPU is bf16 autocast; rto computes in
float32 there. Whether autocast is faster or slower depends on the CPU's bf16 instructions
(`avx512_bf16`, `amx_bf16`): emulated without them, much faster with AMX. This measures, in one
process and interleaved (so that a busy machine slows both alike): one forward, and one forward and
backward, of the throughput benchmark's 25 M policy (plain transformers, 64 × 90 tokens), in float32
and under bf16 autocast; then TRL `GRPOTrainer` iterations (64 samples, 48 new tokens, β = 0.04, as
`benchmarks/throughput.py` runs it) with `bf16=False` and `bf16=True`, with the time of its phases.
Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import write_results  # noqa: E402
from throughput import QUICKSTART, SIZES, count_params, cpu_bf16, cpu_model  # noqa: E402

TRL_PHASES = ("_generate_single_turn", "_get_per_token_logps_and_entropies", "_compute_loss", "training_step")


def policy_config(prepared):
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(prepared.model("policy"))


def model_passes(config, repeats: int, batch: int, length: int) -> dict:
    """Seconds of one forward (no gradient) and one forward + backward, float32 and bf16 autocast,
    interleaved; medians over `repeats` after one warm-up."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(3, config.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, : length // 9] = 0  # left padding, as prompts have

    def forward(autocast: bool) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def forward_backward(autocast: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()

    runs = {
        "forward_fp32": lambda: forward(False),
        "forward_bf16_autocast": lambda: forward(True),
        "forward_backward_fp32": lambda: forward_backward(False),
        "forward_backward_bf16_autocast": lambda: forward_backward(True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):
        for name, run in runs.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(s[1:]), "all": s} for name, s in seconds.items()}


def trl_iterations(model_dir: Path, prepared, bf16: bool, iterations: int, work: Path) -> dict:
    """`iterations` GRPOTrainer steps; seconds per iteration (after the first) and per phase."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rto.models import load_tokenizer

    totals: dict[str, float] = collections.defaultdict(float)
    originals = {name: getattr(GRPOTrainer, name) for name in TRL_PHASES}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return wrapper

    steps: list[float] = []
    for name, fn in originals.items():
        setattr(GRPOTrainer, name, timed(name, fn))
    try:
        args = GRPOConfig(
            output_dir=str(work / f"trl-{'bf16' if bf16 else 'fp32'}"), per_device_train_batch_size=64,
            num_generations=8, max_completion_length=48, max_steps=iterations, learning_rate=1e-9, beta=0.04,
            bf16=bf16, fp16=False, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
            disable_tqdm=True, steps_per_generation=1, num_iterations=1, seed=0,
        )  # fmt: skip
        prompts = [{"prompt": r["prompt"]} for r in prepared.records("prompts")][:1024]

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                steps.append(time.perf_counter() - self.start)

        trainer = GRPOTrainer(
            model=str(model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
            train_dataset=Dataset.from_list(prompts), processing_class=load_tokenizer(prepared.model("policy")),
            callbacks=[Clock()],
        )  # fmt: skip
        trainer.train()
    finally:
        for name, fn in originals.items():
            setattr(GRPOTrainer, name, fn)
    return {
        "iteration_seconds": steps,
        "iteration_seconds_median": statistics.median(steps[1:]),
        "phase_seconds_per_iteration": {k: v / iterations for k, v in totals.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default="25m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="model passes of each kind (after a warm-up)")
    parser.add_argument("--iterations", type=int, default=3, help="TRL iterations per precision")
    parser.add_argument("--name", default="precision")
    args = parser.parse_args()

    import torch

    from pipelines.prepare import prepare
    from rto.config import load_config
    from rto.rundir import RunDir

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = load_config(QUICKSTART, list(SIZES[args.size]))
        prepared = prepare(cfg, RunDir(work / "base").create(), log=lambda m: print(m, flush=True))
        config = policy_config(prepared)
        params = count_params(prepared.model("policy"))
        print(f"model passes ({args.repeats} each, interleaved)...", flush=True)
        passes = model_passes(config, args.repeats, batch=64, length=90)
        trl = {}
        for bf16 in (False, True):
            label = "bf16_autocast" if bf16 else "fp32"
            print(f"TRL GRPO, {label}: {args.iterations} iterations...", flush=True)
            trl[label] = trl_iterations(Path(prepared.model("policy")), prepared, bf16, args.iterations, work)
    ratios = {
        "forward": passes["forward_bf16_autocast"]["median"] / passes["forward_fp32"]["median"],
        "forward_backward": passes["forward_backward_bf16_autocast"]["median"]
        / passes["forward_backward_fp32"]["median"],
        "trl_iteration": trl["bf16_autocast"]["iteration_seconds_median"]
        / trl["fp32"]["iteration_seconds_median"],
    }
    results = {
        "cpu_model": cpu_model(),
        "cpu_bf16": cpu_bf16(),
        "params": params,
        "model_passes": passes,
        "trl": trl,
        "bf16_over_fp32": ratios,
    }
    out = write_results(args.name, vars(args), results)
    print(f"\nCPU {results['cpu_model']}, bf16 instructions: {results['cpu_bf16'] or 'none'}")
    for name, ratio in ratios.items():
        print(f"  {name}: bf16 autocast takes {ratio:.2f}x the float32 time")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
