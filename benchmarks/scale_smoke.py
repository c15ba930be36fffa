"""Realistic-size smoke run: a random-init model of SmolLM-135M's shape (Llama architecture, 30
layers, hidden 576, 9 heads with 3 key/value heads, a 49,152-token vocabulary, tied embeddings)
through `sft → dpo → rm → ppo (2 steps)` on the CPU, once with ZeRO-2 and once with ZeRO-3 on 2
ranks per trainable group, gradient checkpointing on in every trainer.

The tokenizer is built here to SmolLM2-Instruct's conventions: ChatML with a newline after
<|im_end|>, EOS = <|im_end|> and the pad token *equal to* EOS (so rto gives it a distinct pad and
one more embedding row). The words are the built-in text task's, the rest of the vocabulary filler.

Each stage runs as its own `rto run` process on one run directory (finished stages are skipped),
so the time and peak resident memory of the driver (sft, dpo, rm run in it) are per stage; the PPO
stage reports each actor group's peak resident memory (`summary.json` ppo.peak_rss_mb).

    python benchmarks/scale_smoke.py            # both ZeRO stages, about 30-40 min on 2 cores
    python benchmarks/scale_smoke.py --zero 3   # one

Results: benchmarks/results/scale_smoke.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

SMOLLM_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    vocab_size=49152,
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int):
    """SmolLM2-Instruct-like: specials <|endoftext|> (unk), <|im_start|> (bos), <|im_end|> (eos and
    pad); the text task's words; filler up to `vocab_size`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipelines.tasks import text

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [w for w in text.vocabulary() if w not in set(text.SPECIAL_TOKENS.values())]
    vocab = [*specials, "\n", "system", "user", "assistant", *words]
    vocab += [f"tok{i}" for i in range(vocab_size - len(vocab))]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Split(" ", behavior="removed"),
        ]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", extra_special_tokens=["<|endoftext|>"], chat_template=CHATML,
        model_max_length=2048,
    )  # fmt: skip


def build_model(directory: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer(SMOLLM_135M["vocab_size"])
    config = LlamaConfig(
        **SMOLLM_135M, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def job(root: Path, model: Path, data: dict, zero: int, steps: dict) -> dict:
    train = {"batch_size": 4, "max_length": 96, "gradient_checkpointing": True}
    return {
        "seed": 0,
        "device": "cpu",
        "stages": ["sft", "dpo", "rm", "ppo"],
        "task": None,
        "data": {role: {"path": str(path)} for role, path in data.items()},
        "policy": {"path": str(model)},
        "reward_model": {"path": str(model)},
        "sft": {**train, "max_steps": steps["sft"], "lr": 3e-4},
        "dpo": {**train, "max_steps": steps["dpo"], "lr": 1e-5},
        "rm": {**train, "max_steps": steps["rm"], "lr": 1e-5},
        "ppo": {
            "steps": steps["ppo"], "rollout_batch_size": 8, "train_batch_size": 8, "micro_batch_size": 2,
            "max_new_tokens": 32, "zero_stage": zero, "checkpoint_every": 100, "tensorboard": False,
            "temperature": 0.7, "top_p": 0.9,
        },
        "resources": {
            "num_cpus": 4, "torch_threads": 2,
            "policy": {"ranks": 2, "cpus": 0.5}, "critic": {"ranks": 2, "cpus": 0.5},
        },
    }  # fmt: skip


def write_data(directory: Path) -> dict:
    from pipelines.tasks import text

    settings = text.TaskSettings(
        seed=0, n_sft=256, n_pairs=128, n_prompts=64, n_eval=16, label_temperature=0.5, max_sentences=4
    )
    generated = {
        "sft": text.sft_records(settings),
        "pairs": text.preference_records(settings, split="train"),
        "prompts": text.prompt_records(settings, 64, "train"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, records in generated.items():
        paths[role] = directory / f"{role}.jsonl"
        text.write_jsonl(paths[role], records)
    return paths


def run_stage(config: Path, run_dir: Path, stage: str, log) -> dict:
    """`rto run` with only `stage` listed; returns wall seconds and the process's peak RSS (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "rto.cli", "run", str(config), "--run-dir", str(run_dir), "--set", f"stages=[{stage}]"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit {process.returncode}); see {log.name}")
    return {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "driver_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--work", type=Path, default=Path("runs/scale-smoke"))
    parser.add_argument("--sft-steps", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=4)
    parser.add_argument("--rm-steps", type=int, default=4)
    parser.add_argument("--ppo-steps", type=int, default=2)
    args = parser.parse_args()
    steps = {"sft": args.sft_steps, "dpo": args.dpo_steps, "rm": args.rm_steps, "ppo": args.ppo_steps}
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "smollm-135m-shape"
    if not (model / "config.json").is_file():
        build_model(model, seed=0)
    data = write_data(args.work / "data")
    results = {}
    for zero in args.zero:
        run_dir = args.work / f"zero{zero}"
        config = args.work / f"zero{zero}.yaml"
        config.write_text(json.dumps(job(args.work, model, data, zero, steps)))
        phases = {}
        with open(args.work / f"zero{zero}.log", "w") as log:
            for stage in ("sft", "dpo", "rm", "ppo"):
                phases[stage] = run_stage(config, run_dir, stage, log)
                print(f"zero {zero} {stage}: {phases[stage]}", flush=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        for stage in phases:
            phases[stage]["stage_seconds"] = summary[stage]["seconds"]
        ppo = summary["ppo"]
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ppo_steps = [r for r in metrics if r.get("stage") == "ppo"]
        results[f"zero{zero}"] = {
            "phases": phases,
            "ppo_peak_rss_mb_per_group": ppo["peak_rss_mb"],
            "ppo_seconds_per_step": [round(r["time_step"], 1) for r in ppo_steps],
            "ppo_step_times": [
                {k: round(r[k], 1) for k in ("time_generate", "time_score", "time_train", "time_sync")}
                for r in ppo_steps
            ],
            "first_minibatch_ratio_error": [r["first_minibatch_ratio_error"] for r in ppo_steps],
            "first_minibatch_value_clip_frac": [r["first_minibatch_value_clip_frac"] for r in ppo_steps],
        }
    settings = {"shape": SMOLLM_135M, "steps": steps, "job": job(args.work, model, data, 0, steps)}
    settings["job"]["ppo"]["zero_stage"] = args.zero
    path = write_results("scale_smoke", settings, results)
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
