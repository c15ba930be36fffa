"""Rollout cost of a vision-language policy: the PPO rollout worker's `generate` call, dense vs
AdaptInfer-pruned.

    python benchmarks/vlm_rollouts.py                                  # CPU, compute-bound 576-token model
    python benchmarks/vlm_rollouts.py --size tiny --new-tokens 3       # the image quickstart's shape
    python benchmarks/vlm_rollouts.py --device cuda --dtype bfloat16 --size llava-7b --batch-size 16

What is timed is exactly what a PPO step calls: `RolloutWorker.generate` on a batch of
left-padded prompts with one picture each (prefill + `--new-tokens` sampled tokens, T = 1; EOS is
disabled so every configuration generates the same number of tokens). Configurations: transformers'
`generate` (the dense default), our engine with a keep-all schedule (dense, same code path as the
pruned runs, which isolates the effect of pruning from the engine's own overhead) and AdaptInfer
at mean keep ratios of 50 / 25 / 12.5 % of the vision tokens per layer. Random weights (latency
does not depend on training); repetitions interleaved, medians reported.

Writes benchmarks/results/vlm_rollouts[_SIZE].json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adaptinfer import SIZES  # noqa: E402
from common import write_results  # noqa: E402

from pipelines.tasks import image as task  # noqa: E402
from pipelines.tasks import image_model  # noqa: E402
from prune.adaptinfer import AdaptInferConfig  # noqa: E402
from prune.adaptinfer.rollout import AdaptInferGenerate, vision_shape  # noqa: E402
from rto.distributed.rollout import RolloutWorker  # noqa: E402


def build_policy(size: str, folder: Path, dtype: torch.dtype) -> None:
    """A random VLM of the given shape saved as an HF folder (EOS disabled: fixed-length rollouts)."""
    from transformers import LlavaForConditionalGeneration

    processor = task.build_processor()
    if size == "tiny":
        model = image_model.build_model(processor.tokenizer, seed=0)
    else:
        shape = SIZES[size]
        config = image_model.llava_config(processor.tokenizer, vision=shape["vision"], text=shape["text"])
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None
    model.config.get_text_config().eos_token_id = None
    model.to(dtype).save_pretrained(folder)
    processor.save_pretrained(folder)


def prompts(processor, n_vision: int, image_size: int, batch_size: int, dtype) -> dict:
    questions = [e.question for e in task.make_examples(batch_size, seed=7)]
    texts = [task.prompt_text(q, n_vision) for q in questions]
    encoded = processor.tokenizer(texts, return_tensors="pt", padding=True)
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size).to(dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="cpu-576", choices=["tiny", *SIZES])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "policy"
        build_policy(args.size, folder, dtype)
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(folder)
        n_layers, n_vision = vision_shape(config)
        processor = AutoProcessor.from_pretrained(folder)
        batch = prompts(processor, n_vision, config.vision_config.image_size, args.batch_size, dtype)
        generate_fns = {"hf_generate": None, "engine_dense": AdaptInferGenerate({})}
        schedules = {}
        for ratio in args.ratios:
            schedules[ratio] = AdaptInferConfig(keep_ratio=ratio).resolve(n_layers, n_vision)
            generate_fns[f"adaptinfer@{ratio}"] = AdaptInferGenerate(schedules[ratio])
        workers = {
            name: RolloutWorker(
                str(folder),
                **({"generate_fn": fn} if fn else {}),
                max_new_tokens=args.new_tokens,
                temperature=1.0,
                dtype=dtype,
                num_threads=args.threads,
            )  # fmt: skip
            for name, fn in generate_fns.items()
        }
        if args.device != "cpu":
            for worker in workers.values():
                worker.device = torch.device(args.device)
                worker.model.to(worker.device)

        def sync() -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        for worker in workers.values():  # warm-up
            worker.generate(batch)
        seconds: dict[str, list[float]] = {name: [] for name in workers}
        for rep in range(args.reps):
            names = list(workers) if rep % 2 == 0 else list(reversed(workers))
            for name in names:
                torch.manual_seed(rep)
                sync()
                start = time.perf_counter()
                out = workers[name].generate(batch)
                sync()
                seconds[name].append(time.perf_counter() - start)
                assert int(out["response_mask"].sum()) == args.batch_size * args.new_tokens
        median = {name: statistics.median(v) for name, v in seconds.items()}

    rows = []
    for name, value in median.items():
        rows.append(
            {
                "generate": name,
                "seconds": value,
                "ratio_to_hf_generate": value / median["hf_generate"],
                "ratio_to_engine_dense": value / median["engine_dense"],
                "tokens_per_s": args.batch_size * args.new_tokens / value,
            }
        )
        print(
            f"{name:18s} {value:8.3f} s  vs HF generate {value / median['hf_generate']:.3f}  "
            f"vs dense engine {value / median['engine_dense']:.3f}"
        )
    settings = {**vars(args), "out": str(args.out) if args.out else None}
    results = {
        "n_layers": n_layers,
        "n_vision": n_vision,
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "schedules": {str(k): v for k, v in schedules.items()},
        "rows": rows,
        "seconds_all": seconds,
    }
    name = "vlm_rollouts" if args.size == "cpu-576" else f"vlm_rollouts_{args.size}"
    print("wrote", write_results(name, settings, results, args.out))


if __name__ == "__main__":
    main()
