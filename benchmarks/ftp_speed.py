"""FTP speed: prefill and end-to-end rollout wall-clock of the token-skipping model vs the dense one.

    python benchmarks/ftp_speed.py                                   # CPU, random Llama 1024x8, 1024-token prompts
    python benchmarks/ftp_speed.py --device cuda --dtype bfloat16 --size 1b --prompt-len 2048

Every figure is a ratio measured in this run: dense and pruned runs are interleaved repetition by
repetition and each ratio is the median of the per-repetition ratios, so load from other processes
on a shared machine hits both sides alike. Writes benchmarks/results/ftp_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit as git_commit  # noqa: E402

from prune.flops import dense_prefill_flops, token_sparsity_prefill_flops
from prune.ftp.forward import skipping_forward
from prune.ftp.generate import generate_pruned
from prune.ftp.models import SIZES, random_causal_lm
from prune.ftp.router import Router

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        cpu = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        info.update(
            cpu=cpu[0].split(":", 1)[1].strip() if cpu else platform.processor(), cores=os.cpu_count()
        )
        info.update(torch_threads=torch.get_num_threads(), load_average_start=os.getloadavg())
    return info


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(variants: dict, reps: int, device: str, baseline: str = "dense") -> dict:
    """Run every variant once per repetition (rotating the order); -> medians and paired ratios."""
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name].append(timed(variants[name], device))
    out = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times[baseline], ts, strict=True)]
        out[name] = {"median_s": statistics.median(ts), "speedup": statistics.median(ratios), "times_s": ts}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--size", default="cpu", choices=list(SIZES))
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="prefill batch")
    parser.add_argument("--sparsities", default="0.2,0.3,0.4")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--rollout-prompt-len", type=int, default=16, help="quickstart-like rollout prompt")
    parser.add_argument("--rollout-new", type=int, default=48, help="quickstart eval/rollout max_new_tokens")
    parser.add_argument("--rollout-batch", type=int, default=16)
    parser.add_argument("--skip-rollout", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/ftp_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    machine_info = machine(device)  # before the run: the load average at the start
    sparsities = [float(s) for s in args.sparsities.split(",")]

    model = random_causal_lm("llama", args.size, vocab_size=32000, dtype=dtype).to(device)
    n_layers = len(model.model.layers)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 32000, (args.batch, args.prompt_len), generator=gen).to(device)
    router = Router().to(device)  # cost of a trained router = cost of this one (same factors and MLP)

    def prefill(schedule, scorer):
        return lambda: skipping_forward(model, prompt, schedule=schedule, router=scorer, logits_to_keep=1)

    variants = {
        "dense": lambda: model(input_ids=prompt, logits_to_keep=1),
        "ftp s=0": prefill([0.0] * n_layers, "static"),
    }
    for s in sparsities:
        variants[f"static s={s}"] = prefill([s] * n_layers, "static")
        variants[f"learned s={s}"] = prefill([s] * n_layers, router)
    with torch.no_grad():
        prefill_result = interleaved(variants, args.reps, device)
    dense_flops = dense_prefill_flops(model.config, args.prompt_len)
    for name, row in prefill_result.items():
        s = float(name.split("=")[1]) if "=" in name else 0.0
        row["flops_ratio"] = (
            token_sparsity_prefill_flops(model.config, args.prompt_len, [s] * n_layers) / dense_flops
        )

    rollout_result = {}
    if not args.skip_rollout:
        rprompt = torch.randint(3, 32000, (args.rollout_batch, args.rollout_prompt_len), generator=gen).to(
            device
        )
        settings = dict(max_new_tokens=args.rollout_new, do_sample=False, eos_token_id=None, pad_token_id=0)

        def rollout(schedule, scorer):
            return lambda: generate_pruned(model, scorer, schedule, rprompt, **settings)

        rvariants = {
            "dense": lambda: model.generate(rprompt, attention_mask=torch.ones_like(rprompt), **settings),
            "ftp s=0": rollout([0.0] * n_layers, "static"),
            "static s=0.3": rollout([0.3] * n_layers, "static"),
            # random routing skips a decoded token at a block with probability s: what a router
            # trained to skip 30% of decoded tokens would save
            "decode-skip s=0.3": rollout([0.3] * n_layers, "random"),
        }
        with torch.no_grad():
            rollout_result = interleaved(rvariants, max(3, args.reps // 2), device)

    header = f"{'variant':<20}{'median s':>10}{'speedup':>9}{'FLOPs':>8}"
    print(
        f"\nprefill: {args.size} Llama ({n_layers} layers), batch {args.batch} x {args.prompt_len} tokens, {device} {args.dtype}"
    )
    print(header)
    for name, row in prefill_result.items():
        print(f"{name:<20}{row['median_s']:>10.3f}{row['speedup']:>8.2f}x{row['flops_ratio']:>8.2f}")
    if rollout_result:
        print(
            f"\nrollout: batch {args.rollout_batch}, prompt {args.rollout_prompt_len}, {args.rollout_new} new tokens"
        )
        for name, row in rollout_result.items():
            print(f"{name:<20}{row['median_s']:>10.3f}{row['speedup']:>8.2f}x")

    record = {
        "benchmark": "ftp_speed",
        "commit": git_commit(),
        "machine": machine_info | ({"load_average_end": os.getloadavg()} if device == "cpu" else {}),
        "settings": vars(args) | {"n_layers": n_layers, "shape": SIZES[args.size]},
        "prefill": prefill_result,
        "rollout": rollout_result,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
