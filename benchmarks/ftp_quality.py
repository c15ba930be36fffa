"""FTP quality: retention of the built-in text task's SFT policy under token pruning.

    rto run configs/quickstart.yaml --set 'stages=[sft]' --run-dir runs/ftp-bench
    python benchmarks/ftp_quality.py --model runs/ftp-bench/stages/sft

    # the facts variant's 12-layer policy, long prompts (cached by benchmarks/pruned_ppo.py)
    python benchmarks/ftp_quality.py --variant facts --model ~/.cache/rto/facts-12l-v1/stages/sft \
        --sparsities 0.3 --out benchmarks/results/ftp_facts.json

At each token sparsity (default 20/30/40%) it fits FTP on the policy's SFT data (static-router
schedule search, router training, search again) and compares, against the dense model in the same
run: FTP-learned, FTP-static (searched schedule, static router), uniform schedule (static router),
random routing (FTP-learned's schedule) and ShortGPT (layers removed by block influence, as many
as make its whole-rollout FLOPs closest to FTP's with dense decoding: prefill and decode, at the
measured prompt and response lengths). Every row states its FLOPs for the prefill and for the whole
rollout, from the tokens each block actually computed. Metrics: ground-truth reward of sampled responses to held-out prompts
(same sampling seed for every method) as a fraction of dense, next-token agreement and mean
KL(dense || pruned) teacher-forced on held-out SFT sequences. Writes benchmarks/results/ftp.json.
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
from ftp_speed import git_commit  # noqa: E402

from pipelines.tasks import text as plain_task  # noqa: E402
from pipelines.tasks import text_facts as facts_task  # noqa: E402
from pipelines.tasks.text import TaskSettings  # noqa: E402
from prune.flops import dense_prefill_flops, token_sparsity_prefill_flops, token_sparsity_rollout_flops  # noqa: E402
from prune.ftp.config import FTPConfig  # noqa: E402
from prune.ftp.data import encode_record, left_padded_batches  # noqa: E402
from prune.ftp.fit import fit_ftp  # noqa: E402
from prune.ftp.forward import skipping_forward  # noqa: E402
from prune.ftp.generate import generate_pruned  # noqa: E402
from prune.ftp.losses import distill_kl  # noqa: E402
from prune.shortgpt import block_influence, layers_to_remove, removal_schedule  # noqa: E402
from rto.generation import encode_prompt, prompt_text  # noqa: E402
from rto.models import load_causal_lm, load_tokenizer  # noqa: E402


@torch.no_grad()
def teacher_forced(model, router, schedule, batches, teachers) -> dict:
    agree, total, kls = 0, 0, []
    for (ids, mask), teacher in zip(batches, teachers, strict=True):
        logits = skipping_forward(model, ids, mask, schedule=schedule, router=router).logits
        valid = mask.bool()
        agree += int((logits.argmax(-1) == teacher.argmax(-1))[valid].sum())
        total += int(valid.sum())
        kls.append(float(distill_kl(teacher, logits, valid)))
    return {"agreement": agree / total, "kl": statistics.fmean(kls)}


@torch.no_grad()
def rollout_reward(model, router, schedule, tokenizer, prompts, args, threshold=0.5) -> dict:
    """Mean ground truth of sampled responses; the same generator seed for every method."""
    gen = torch.Generator().manual_seed(args.seed)
    stats, rewards, lengths = {}, [], []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start : start + args.batch]
        ((ids, mask),) = left_padded_batches([encode_prompt(tokenizer, p) for p in chunk], len(chunk), pad)
        seqs = generate_pruned(
            model, router, schedule, ids, mask, max_new_tokens=args.max_new_tokens, do_sample=True,
            temperature=args.temperature, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad,
            generator=gen, stats=stats, threshold=threshold,
        )  # fmt: skip
        for prompt, row in zip(chunk, seqs[:, ids.shape[1] :].tolist(), strict=True):
            terminated = eos in row
            text = tokenizer.decode(row[: row.index(eos)] if terminated else row, skip_special_tokens=True)
            rewards.append(args.reward(prompt_text(prompt), text.strip(), terminated))
            lengths.append(min(len(row), row.index(eos) + 1 if terminated else len(row)))
    sparsity = 1 - sum(stats["computed"]) / max(sum(stats["tokens"]), 1)
    decode_keep = [
        c / max(t, 1) for c, t in zip(stats["decode_computed"], stats["decode_tokens"], strict=True)
    ]
    return {
        "gt_reward": statistics.fmean(rewards), "rollout_sparsity": sparsity, "rewards": rewards,
        "decode_keep": decode_keep, "response_tokens": statistics.fmean(lengths),
    }  # fmt: skip


def sparsity_for_flops(config, n_tokens: int, n_layers: int, flops_ratio: float) -> float:
    """Uniform token sparsity whose prefill FLOPs are `flops_ratio` of dense (bisection)."""
    dense = dense_prefill_flops(config, n_tokens)
    low, high = 0.0, 0.99
    for _ in range(40):
        mid = (low + high) / 2
        if token_sparsity_prefill_flops(config, n_tokens, [mid] * n_layers) / dense > flops_ratio:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| sparsity | method | prefill FLOPs | rollout FLOPs | rollout token sparsity | GT reward retention "
        "| GT Δ vs dense (± s.e.) | next-token agreement | KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']:.0%} | {r['method']} | {r['flops_ratio']:.2f} | {r['rollout_flops_ratio']:.2f} | "
            f"{r['rollout_sparsity']:.2f} | "
            f"{r['gt_retention']:.1%} | {r['gt_delta']:+.3f} ± {r['gt_delta_se']:.3f} | {r['agreement']:.3f} | "
            f"{r['kl']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/ftp-bench/stages/sft", help="SFT policy folder")
    parser.add_argument("--sparsities", default="0.2,0.3,0.4")
    parser.add_argument(
        "--match-shortgpt",
        default="1,2",
        help="also the token sparsities whose FLOPs equal ShortGPT minus these layers",
    )
    parser.add_argument("--variant", choices=["plain", "facts"], default="plain", help="text task variant")
    parser.add_argument("--n-facts", type=int, default=56, help="facts variant: facts per context")
    parser.add_argument("--task-seed", type=int, default=0)
    parser.add_argument("--n-prompts", type=int, default=512, help="held-out prompts sampled per method")
    parser.add_argument("--n-heldout", type=int, default=256, help="held-out SFT sequences (teacher-forced)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--train-steps", type=int, default=FTPConfig().train.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/ftp.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    tokenizer = load_tokenizer(args.model, field="--model")
    model = load_causal_lm(args.model, field="--model").eval()
    model.requires_grad_(False)
    n_layers, pad = len(model.model.layers), tokenizer.pad_token_id
    settings = TaskSettings(seed=args.task_seed)
    if args.variant == "facts":
        n, max_length = args.n_facts, 1024
        sft_records = lambda s: facts_task.sft_records(s, n)  # noqa: E731
        prompt_records = lambda s, k, split: facts_task.prompt_records(s, n, k, split)  # noqa: E731
        args.reward = facts_task.reward
    else:
        sft_records, prompt_records, max_length = plain_task.sft_records, plain_task.prompt_records, 128
        args.reward = plain_task.reward
    train_seqs = [encode_record(tokenizer, r, max_length) for r in sft_records(settings)]
    heldout = sft_records(TaskSettings(seed=args.task_seed + 1000, n_sft=args.n_heldout))
    heldout_batches = left_padded_batches(
        [encode_record(tokenizer, r, max_length) for r in heldout], args.batch, pad
    )
    teachers = [model(input_ids=i, attention_mask=m).logits for i, m in heldout_batches]
    prompts = [r["prompt"] for r in prompt_records(settings, args.n_prompts, "eval")]
    prompt_len = round(statistics.fmean(len(encode_prompt(tokenizer, p)) for p in prompts))
    mean_len = round(statistics.fmean(len(s) for s in train_seqs))

    dense = {**teacher_forced(model, "static", [0.0] * n_layers, heldout_batches, teachers)}
    dense.update(rollout_reward(model, "static", [0.0] * n_layers, tokenizer, prompts, args))
    print(f"dense: GT reward {dense['gt_reward']:.3f}")
    influence = block_influence(model, heldout_batches[:2])
    response_len = round(dense["response_tokens"])
    dense_rollout = sum(
        token_sparsity_rollout_flops(model.config, prompt_len, response_len, [0.0] * n_layers)
    )

    def rollout_ratio(schedule, decode_keep) -> float:
        pruned = token_sparsity_rollout_flops(model.config, prompt_len, response_len, schedule, decode_keep)
        return sum(pruned) / dense_rollout

    rows = []
    sparsities = [float(s) for s in args.sparsities.split(",")]
    for n_remove in [int(n) for n in args.match_shortgpt.split(",") if n]:
        sparsities.append(
            round(sparsity_for_flops(model.config, mean_len, n_layers, 1 - n_remove / n_layers), 3)
        )
    for sparsity in sparsities:
        cfg = FTPConfig(
            sparsity=sparsity,
            seed=args.seed,
            decode_threshold="calibrated",
            train={"steps": args.train_steps},
        )
        calib = left_padded_batches(train_seqs[: cfg.search.calib_samples], cfg.train.batch_size, pad)
        n_train = cfg.train.steps * cfg.train.batch_size
        train = left_padded_batches(
            train_seqs[cfg.search.calib_samples :][:n_train], cfg.train.batch_size, pad
        )
        calib_prompts = [
            encode_prompt(tokenizer, r["prompt"]) for r in sft_records(settings)[: cfg.search.calib_samples]
        ]
        prompt_batches = left_padded_batches(calib_prompts, cfg.train.batch_size, pad)
        fitted = fit_ftp(model, train, calib, cfg, prompt_batches, log=lambda m: None)
        # ShortGPT at FTP's whole-rollout compute (FTP decoding densely): both phases lose n/L
        target = rollout_ratio(fitted.schedule, None)
        n_remove = min(range(n_layers), key=lambda n: abs((n_layers - n) / n_layers - target))
        removed = layers_to_remove(influence, n_remove)
        methods = {
            "FTP-learned, calibrated decode": (fitted.router, fitted.schedule, fitted.decode_thresholds),
            "FTP-learned, paper decode (0.5)": (fitted.router, fitted.schedule, 0.5),
            "FTP-learned, dense decode": (fitted.router, fitted.schedule, 0.0),
            "FTP-static": ("static", fitted.static_schedule, 0.5),
            "uniform": ("static", [sparsity] * n_layers, 0.5),
            "random": ("random", fitted.schedule, 0.5),
            f"ShortGPT (-{n_remove} layers)": ("static", removal_schedule(n_layers, removed), 0.5),
        }
        for name, (router, schedule, threshold) in methods.items():
            row = {"sparsity": sparsity, "method": name, "schedule": [round(s, 3) for s in schedule]}
            row["flops_ratio"] = token_sparsity_prefill_flops(
                model.config, mean_len, schedule
            ) / dense_prefill_flops(model.config, mean_len)
            row.update(teacher_forced(model, router, schedule, heldout_batches, teachers))
            row.update(rollout_reward(model, router, schedule, tokenizer, prompts, args, threshold))
            row["rollout_flops_ratio"] = rollout_ratio(schedule, row["decode_keep"])
            diffs = [a - b for a, b in zip(row.pop("rewards"), dense["rewards"], strict=True)]
            row["gt_delta"] = statistics.fmean(diffs)
            row["gt_delta_se"] = statistics.stdev(diffs) / len(diffs) ** 0.5
            row["gt_retention"] = row["gt_reward"] / dense["gt_reward"]
            rows.append(row)
            print(
                f"s={sparsity:.1f} {name:<24} FLOPs {row['flops_ratio']:.2f} rollout-sparsity {row['rollout_sparsity']:.2f} "
                f"agree {row['agreement']:.3f} KL {row['kl']:.4f} GT {row['gt_reward']:.3f} ({row['gt_retention']:.1%})"
            )

    print(
        f"\nSFT policy {args.model}: dense GT reward {dense['gt_reward']:.3f} on {args.n_prompts} prompts\n"
    )
    print(markdown_table(rows))
    record = {
        "benchmark": "ftp_quality",
        "commit": git_commit(),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cores": os.cpu_count(),
            "threads": args.threads,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "reward"}
        | {
            "reward": args.reward.__module__,
            "n_layers": n_layers,
            "mean_sequence_tokens": mean_len,
            "prompt_tokens": prompt_len,
            "response_tokens": response_len,
            "block_influence": influence,
        },
        "dense": {k: v for k, v in dense.items() if k != "rewards"},
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
