"""Peak memory of one PPO policy train step (`rto.ppo.losses:policy_loss` forward + backward + step
through a real DeepSpeed engine, ZeRO-2, one rank) on a model with a 32k vocabulary, with the
logits computed only for the response positions (`logits_to_keep`, what rto does) and for every
position (what it did before `logits_to_keep` was passed through the engine: issue 13 item 7).

Each variant runs in a fresh process; the figure is its peak resident memory during the step
above what it held just before (model, optimizer states and batch already in memory).

    python benchmarks/logits_memory.py              # about a minute on 2 cores

Results: benchmarks/results/logits_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

SHAPE = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
)  # fmt: skip


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_step(model_dir: str, variant: str, batch: int, prompt: int, response: int) -> dict:
    import torch

    import rto.forward
    from rto.distributed import EngineConfig, TrainableWorker

    if variant == "all_positions":  # the old behaviour: the engine's signature hid logits_to_keep
        rto.forward._accepts = lambda model, argument: False
    worker = TrainableWorker(
        model_dir, EngineConfig(zero_stage=2, lr=1e-5, micro_batch_size=batch, gradient_accumulation_steps=1)
    )
    worker.setup()
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, SHAPE["vocab_size"], (batch, prompt + response), generator=generator)
    mask = torch.ones_like(sequences)
    minibatch = {
        "sequences": sequences, "attention_mask": mask, "prompt_len": prompt,
        "response_mask": torch.ones(batch, response), "old_logprobs": torch.full((batch, response), -10.4),
        "advantages": torch.randn(batch, response, generator=generator),
    }  # fmt: skip
    worker.train_step(minibatch, "rto.ppo.losses:policy_loss")  # warm-up: optimizer states allocated
    before = rss_mb()
    worker.train_step(minibatch, "rto.ppo.losses:policy_loss")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rss_before_mb": round(before, 1),
        "peak_mb": round(peak, 1),
        "step_peak_above_mb": round(peak - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--variant", choices=["response_only", "all_positions"])
    parser.add_argument("--model", type=str)
    args = parser.parse_args()
    if args.variant:  # the child process
        print(json.dumps(one_step(args.model, args.variant, args.batch, args.prompt, args.response)))
        return

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).save_pretrained(model_dir)
        env = {**os.environ, "OMP_NUM_THREADS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
        results = {}
        for variant in ("all_positions", "response_only"):
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--model", model_dir, "--batch", str(args.batch),
                 "--prompt", str(args.prompt), "--response", str(args.response)],
                capture_output=True, text=True, env=env, check=True,
            )  # fmt: skip
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(variant, results[variant], flush=True)
    ratio = results["response_only"]["step_peak_above_mb"] / results["all_positions"]["step_peak_above_mb"]
    results["step_memory_ratio"] = round(ratio, 3)
    settings = {
        "shape": SHAPE,
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "response_tokens": args.response,
    }
    path = write_results("logits_memory", settings, results)
    print(f"step memory above the resting state: {ratio:.2f}x of before; wrote {path}")


if __name__ == "__main__":
    main()
