"""AdaptInfer vs AdaptInfer-without-prior vs FastV vs random vision-token pruning.

    python benchmarks/adaptinfer.py                      # CPU: trained tiny VLM + compute-bound latency model
    python benchmarks/adaptinfer.py --device cuda --dtype bfloat16 --size llava-7b   # GPU latency at 7B shape

Part 1 (accuracy, tiny VLM of the built-in image task, trained here if `--model` is missing): at
mean keep ratios of 50 / 25 / 12.5 % of the vision tokens per decoder layer, accuracy retention
(pruned accuracy / dense accuracy, same eval set), decoder prefill FLOPs and prefill latency as
ratios to the dense model. Part 2 (latency, random model): LLaVA-1.5's 576 vision tokens and 32
layers with a scaled-down language model (or the real 7B shape with `--size llava-7b`), so that
the latency ratio reflects compute rather than Python overhead. Repetitions are interleaved
(every configuration once per round) and medians taken, since the machine may be shared.

Writes benchmarks/results/adaptinfer.json (machine, commit, settings, every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.tasks import image as task  # noqa: E402
from pipelines.tasks import image_model  # noqa: E402
from prune.adaptinfer import (  # noqa: E402
    PRESETS,
    decode,
    generate_pruned,
    mean_vision_tokens,
    prefill,
    proportional_schedule,
)
from prune.adaptinfer.analysis import inflection_layers, text_to_vision_profile  # noqa: E402
from prune.fastv import fastv_schedule_for_budget  # noqa: E402
from prune.flops import attention_rows_flops, lm_head_flops, prefill_flops_per_layer  # noqa: E402
from rto.errors import UserError  # noqa: E402

METHODS = ["adaptinfer", "adaptinfer_no_prior", "fastv", "random"]
SIZES = {
    # scaled-down LM at LLaVA-1.5's depth and vision-token count; tiny vision tower (not pruned)
    "cpu-576": dict(
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
            projection_dim=64,
        ),
        text=dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
    ),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama-2-7B (Vicuna) shapes
    "llava-7b": dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        ),
    ),
}


def schedules_for(n_layers: int, n_vision: int, ratio: float) -> dict[str, dict[int, int]]:
    """Same mean budget for every method; FastV uses K = 2 scaled to the depth (at least 1)."""
    budget = ratio * n_vision
    ours = proportional_schedule(n_layers, n_vision, budget)
    fastv_k = max(1, round(2 * n_layers / 32))
    return {
        "adaptinfer": ours,
        "adaptinfer_no_prior": ours,
        "fastv": fastv_schedule_for_budget(n_layers, n_vision, budget, k=fastv_k),
        "random": ours,
    }


def prefill_flops(config, trace) -> float:
    """Decoder-layer FLOPs for the tokens actually present, plus the explicit scoring rows."""
    per_layer = prefill_flops_per_layer(config, trace.tokens_per_layer)
    scoring = sum(attention_rows_flops(config, q, k) for q, k in trace.scoring.values())
    return sum(per_layer) + scoring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_prefills(model, inputs, configs: dict[str, tuple[str, dict]], reps: int, device: str) -> dict:
    """Interleaved timings of `prefill` (cache built, as generation does) per configuration; medians."""
    samples: dict[str, list[float]] = {name: [] for name in configs}
    with torch.no_grad():
        for method, schedule in configs.values():  # warm-up
            prefill(
                model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], schedule, method
            )
        for rep in range(reps):
            names = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for name in names:
                method, schedule = configs[name]
                sync(device)
                start = time.perf_counter()
                prefill(
                    model,
                    inputs["input_ids"],
                    inputs["pixel_values"],
                    inputs["attention_mask"],
                    schedule,
                    method,
                )
                sync(device)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def generator_for(method: str, seed: int = 0):
    return torch.Generator().manual_seed(seed) if method == "random" else None


# ---------------------------------------------------------------- part 1: accuracy on the tiny VLM


def accuracy_part(args) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        print(f"training the tiny VLM into {model_dir} (image_model.sft_recipe)...", flush=True)
        print(image_model.sft_recipe(model_dir), flush=True)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    n_layers = model.config.text_config.num_hidden_layers
    n_vision = task.N_VISION_TOKENS
    examples = task.make_examples(args.n_eval, seed=args.eval_seed)
    batches = [task.encode(processor, examples[i : i + 64]) for i in range(0, len(examples), 64)]

    objects = [image_model.object_tokens(batch["pixel_values"]) for batch in batches]

    def run(method: str, schedule: dict, positions: str = "original") -> dict:
        """Accuracy (all, per question kind), prefill FLOPs and object recall per cut layer."""
        correct, flops, kinds, recall, asked_kept = [], 0.0, {}, {}, []
        generator = generator_for(method)
        for start, batch, shown in zip(range(0, len(examples), 64), batches, objects, strict=True):
            chunk = examples[start : start + 64]
            if positions == "original":
                out = generate_pruned(model, batch, schedule, method, max_new_tokens=2, generator=generator)
                new, trace = out.sequences[:, batch["input_ids"].shape[1] :], out.trace
            else:
                new, trace = greedy_two_tokens(model, batch, schedule, method, generator, positions)
            texts = processor.tokenizer.batch_decode(new)
            for text, example in zip(texts, chunk, strict=True):
                ok = task.reward(text.replace(task.SPECIAL["pad"], " "), example.answer)
                correct.append(ok)
                kinds.setdefault(task.question_kind(example.question), []).append(ok)
            for layer, kept in trace.kept_vision.items():
                hit = shown.gather(1, kept).sum(-1).float() / shown.sum(-1)
                recall.setdefault(int(layer), []).extend(hit.tolist())
            for b, example in enumerate(chunk):  # per cut: did the tokens the question is about survive?
                asked = task.asked_tokens(example)
                asked_kept.append(
                    {int(layer): asked <= set(kept[b].tolist()) for layer, kept in trace.kept_vision.items()}
                )
            flops += prefill_flops(model.config, trace)
        return dict(
            accuracy=statistics.mean(correct),
            correct=correct,
            accuracy_by_kind={k: statistics.mean(v) for k, v in sorted(kinds.items())},
            object_recall={layer: statistics.mean(v) for layer, v in sorted(recall.items())},
            asked_kept=asked_kept,
            flops=flops,
        )

    dense = run("adaptinfer", {})
    dense_acc, dense_flops = dense["accuracy"], dense["flops"]
    answered: dict[tuple[str, float], list[float]] = {}  # (method, ratio) -> per-question 0/1
    answered_kept: dict[tuple[str, float], list[dict]] = {}  # ... -> per question {cut: asked kept}
    with torch.no_grad():
        hf_acc = image_model.evaluate(model, processor, examples)
    rows, timing_configs = [], {"dense": ("adaptinfer", {})}
    # the paper's offline analysis: cut where text-to-vision attention drops (on training-like data)
    profile = text_to_vision_profile(model, [task.encode(processor, task.make_examples(64, seed=999))])
    profiled_layers = inflection_layers(profile, 3)
    for ratio in args.ratios:
        schedules = {
            name: (name, s, "original") for name, s in schedules_for(n_layers, n_vision, ratio).items()
        }
        schedules["adaptinfer_contiguous"] = ("adaptinfer", schedules["adaptinfer"][1], "contiguous")
        try:
            profiled = proportional_schedule(n_layers, n_vision, ratio * n_vision, layers=profiled_layers)
            schedules["adaptinfer_profiled"] = ("adaptinfer", profiled, "original")
            schedules["random_profiled"] = ("random", profiled, "original")
        except UserError as error:
            print(f"  adaptinfer_profiled keep {ratio}: skipped ({error})")
        for name, (method, schedule, positions) in schedules.items():
            result = run(method, schedule, positions)
            acc = result["accuracy"]
            answered[name, ratio] = result["correct"]
            answered_kept[name, ratio] = result["asked_kept"]
            rows.append(
                dict(
                    method=name,
                    scorer=method,
                    positions=positions,
                    keep_ratio=ratio,
                    schedule=schedule,
                    mean_vision_tokens=mean_vision_tokens(schedule, n_layers, n_vision),
                    accuracy=acc,
                    accuracy_se=standard_error(result["correct"]),
                    retention=acc / dense_acc,
                    accuracy_by_kind=result["accuracy_by_kind"],
                    object_recall=result["object_recall"],
                    flops_ratio=result["flops"] / dense_flops,
                )
            )
            timing_configs[f"{name}@{ratio}"] = (method, schedule)
            recall = " ".join(f"L{k}:{v:.2f}" for k, v in result["object_recall"].items())
            print(
                f"  {name:22s} keep {ratio:6.3f}: acc {acc:.3f} retention {acc / dense_acc:.3f} "
                f"object recall {recall}",
                flush=True,
            )
    for row in rows:  # paired on the same questions: differences are far less noisy than accuracies
        mine, fastv = answered[row["method"], row["keep_ratio"]], answered["fastv", row["keep_ratio"]]
        row["vs_fastv"] = paired_difference(mine, fastv)
        row["vs_dense"] = paired_difference(mine, dense["correct"])
        # per cut: accuracy on the questions whose asked-about objects survived it / did not, vs dense
        row["asked_objects"] = asked_split(
            answered_kept[row["method"], row["keep_ratio"]], mine, dense["correct"]
        )
    latency = time_prefills(model, batches[0], timing_configs, args.reps, "cpu")
    for row in rows:
        row["latency_ratio"] = latency[f"{row['method']}@{row['keep_ratio']}"] / latency["dense"]
    return dict(
        model=str(model_dir),
        n_layers=n_layers,
        n_vision=n_vision,
        n_eval=len(examples),
        dense_accuracy=dense_acc,
        dense_accuracy_hf_generate=hf_acc,
        dense_accuracy_by_kind=dense["accuracy_by_kind"],
        text_to_vision_profile=profile,
        profiled_cut_layers=profiled_layers,
        chance_accuracy=chance(examples),
        dense_prefill_seconds=latency["dense"],
        batch_size_latency=64,
        rows=rows,
    )


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a − b over the same questions and its standard error."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    return dict(difference=statistics.mean(differences), se=standard_error(differences))


def asked_split(kept: list[dict], pruned: list[float], dense: list[float]) -> dict:
    """Per cut layer: share of the questions whose asked-about objects (`task.asked_tokens`)
    survived the cut, and the pruned and dense accuracy on those (`kept`) and the others (`lost`)."""
    out = {}
    for layer in kept[0] if kept else {}:
        split = {}
        for label, flag in (("kept", True), ("lost", False)):
            chosen = [i for i, k in enumerate(kept) if k[layer] == flag]
            split[label] = dict(
                share=len(chosen) / len(kept),
                accuracy=statistics.mean(pruned[i] for i in chosen) if chosen else None,
                dense_accuracy=statistics.mean(dense[i] for i in chosen) if chosen else None,
            )
        out[layer] = split
    return out


@torch.no_grad()
def greedy_two_tokens(model, batch, schedule, method, generator, positions):
    """Greedy answer word + EOS with `prefill(positions=...)` and one `decode` step.

    What `generate_pruned(..., max_new_tokens=2)` does, for position conventions it does not take.
    """
    logits, state, trace = prefill(
        model,
        batch["input_ids"],
        batch["pixel_values"],
        batch["attention_mask"],
        schedule,
        method,
        generator,
        positions=positions,
    )
    first = logits.argmax(-1)
    second = decode(model, first, state).argmax(-1)
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    second = torch.where(first == eos, torch.full_like(second, pad), second)
    return torch.stack([first, second], dim=1), trace


def chance(examples) -> float:
    """Accuracy of always answering the most frequent answer of each question kind."""
    from collections import Counter

    kinds: dict[str, Counter] = {}
    for e in examples:
        kinds.setdefault(task.question_kind(e.question), Counter())[e.answer] += 1
    return sum(c.most_common(1)[0][1] for c in kinds.values()) / len(examples)


# ---------------------------------------------------------------- part 2: compute-bound latency


def latency_part(args) -> dict:
    from transformers import LlavaForConditionalGeneration

    size = SIZES[args.size]
    dtype = getattr(torch, args.dtype)
    tokenizer = task.build_tokenizer()
    config = image_model.llava_config(tokenizer, vision=size["vision"], text=size["text"])
    config.text_config.vocab_size = 32064 if args.size == "llava-7b" else config.text_config.vocab_size
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the 7B shape directly in bf16 on the device
    try:
        with torch.device(args.device):
            model = LlavaForConditionalGeneration(config).to(dtype).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    n_vision = (size["vision"]["image_size"] // size["vision"]["patch_size"]) ** 2
    n_layers = size["text"]["num_hidden_layers"]
    question = "what color is the circle ?"
    ids = tokenizer(task.prompt_text(question, n_vision), return_tensors="pt")["input_ids"]
    ids = ids.repeat(args.batch_size, 1).to(args.device)
    image = size["vision"]["image_size"]
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(args.batch_size, 3, image, image, dtype=dtype, device=args.device),
    )
    configs = {"dense": ("adaptinfer", {})}
    for ratio in args.ratios:
        for method, schedule in schedules_for(n_layers, n_vision, ratio).items():
            configs[f"{method}@{ratio}"] = (method, schedule)
    if n_layers == 32 and n_vision == 576:
        configs["adaptinfer@preset-llava-1.5-64"] = ("adaptinfer", PRESETS["llava-1.5-64"])
    latency = time_prefills(model, inputs, configs, args.reps, args.device)
    rows = []
    with torch.no_grad():
        for name, (method, schedule) in configs.items():
            _, _, trace = prefill(
                model, ids, inputs["pixel_values"], inputs["attention_mask"], schedule, method
            )
            rows.append(
                dict(
                    name=name,
                    method=method,
                    schedule=schedule,
                    mean_vision_tokens=mean_vision_tokens(schedule, n_layers, n_vision),
                    seconds=latency[name],
                    latency_ratio=latency[name] / latency["dense"],
                    flops=prefill_flops(config, trace),
                )
            )
    dense_flops = rows[0]["flops"]
    for row in rows:
        row["flops_ratio"] = row["flops"] / dense_flops
    return dict(
        size=args.size,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        n_layers=n_layers,
        n_vision=n_vision,
        prompt_tokens=ids.shape[1],
        reps=args.reps,
        lm_head_flops_last_token=lm_head_flops(config, args.batch_size),
        rows=rows,
    )


# ---------------------------------------------------------------- report


def machine() -> dict:
    info = dict(
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        processor=platform.processor(),
    )
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain")))


def print_tables(result: dict) -> None:
    acc = result.get("accuracy")
    if acc:
        print(
            f"\nTiny VLM ({acc['n_layers']} layers, {acc['n_vision']} vision tokens), {acc['n_eval']} questions: "
            f"dense accuracy {acc['dense_accuracy']:.3f} (chance {acc['chance_accuracy']:.3f})"
        )
        kinds = acc.get("dense_accuracy_by_kind", {})
        print("dense accuracy by question kind: " + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items()))
        print(
            f"{'keep':>6} {'method':22} {'mean vis':>8} {'acc':>6} {'retention':>9} {'FLOPs':>6} {'latency':>7}"
            f"  {'vs FastV (±SE)':>15}  {'asked kept @1st cut, acc/dense':>30}  {'color/shape/count':>17}"
            "  object recall per cut"
        )
        for r in acc["rows"]:
            by_kind = "/".join(
                f"{r['accuracy_by_kind'].get(k, 0.0):.2f}" for k in ("color", "shape", "count")
            )
            recall = " ".join(f"L{k}:{v:.2f}" for k, v in r.get("object_recall", {}).items())
            versus = r.get("vs_fastv", {})
            versus = f"{versus['difference']:+.3f}±{versus['se']:.3f}" if versus else ""
            first = next(iter(r.get("asked_objects", {}).values()), {}).get("kept", {})
            kept = (
                f"{first['share']:.2f}, {first['accuracy']:.3f}/{first['dense_accuracy']:.3f}"
                if first.get("accuracy") is not None
                else ""
            )
            print(
                f"{r['keep_ratio']:6.3f} {r['method']:22} {r['mean_vision_tokens']:8.2f} {r['accuracy']:6.3f} "
                f"{r['retention']:9.3f} {r['flops_ratio']:6.3f} {r['latency_ratio']:7.3f}  {versus:>15}  "
                f"{kept:>30}  {by_kind:>17}  {recall}"
            )
    lat = result.get("latency")
    if lat:
        print(
            f"\nLatency model '{lat['size']}' ({lat['device']}, {lat['dtype']}, batch {lat['batch_size']}, "
            f"{lat['prompt_tokens']} prompt tokens, {lat['n_vision']} vision): prefill, ratios to dense"
        )
        print(f"{'configuration':34} {'mean vis':>8} {'seconds':>8} {'latency':>7} {'FLOPs':>6}")
        for r in lat["rows"]:
            print(
                f"{r['name']:34} {r['mean_vision_tokens']:8.1f} {r['seconds']:8.4f} {r['latency_ratio']:7.3f} "
                f"{r['flops_ratio']:6.3f}"
            )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=str(Path.home() / ".cache" / "rto" / "image-vlm-v4"),
        help="trained tiny VLM dir (trained here when missing)",
    )
    parser.add_argument("--n-eval", type=int, default=2048)
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=12345,
        help="seed of the held-out questions (choose models or settings on another seed, report on this one)",
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the latency model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", default="cpu-576", choices=sorted(SIZES))
    parser.add_argument("--skip-accuracy", action="store_true", help="latency part only (default on CUDA)")
    parser.add_argument("--skip-latency", action="store_true", help="accuracy part only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptinfer.json"))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier timings on a shared machine)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = dict(
        benchmark="adaptinfer",
        machine=machine(),
        git=git_commit(),
        settings=vars(args),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if not args.skip_accuracy and args.device == "cpu":
        result["accuracy"] = accuracy_part(args)
    if not args.skip_latency:
        result["latency"] = latency_part(args)
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
