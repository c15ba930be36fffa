"""`eval`: sample each available policy on held-out prompts and score the responses with the task's
ground truth (where it has one) and the reward model (where one was trained)."""

from __future__ import annotations

import statistics

from pipelines.stages import StageContext, no_grad, register_stage
from rto.models import load_causal_lm, load_processor, load_tokenizer, load_vision_lm, sampling_token_ids


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of `values` (0 for fewer than two)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def policy_paths(ctx: StageContext) -> dict[str, str]:
    candidates = {
        "base": ctx.prepared.model("policy"),
        "sft": ctx.run.stage_dir("sft") if ctx.has_stage("sft") else None,
        "dpo": ctx.run.stage_dir("dpo") if ctx.has_stage("dpo") else None,
        "ppo": ctx.run.stage_dir("ppo") / "policy" if ctx.has_stage("ppo") else None,
    }
    return {name: str(candidates[name]) for name in ctx.cfg.eval.models if candidates.get(name)}


def evaluate_policy(ctx: StageContext, path: str, prompts: list, rm_scorer=None) -> dict:
    # deferred: every stage module is imported to validate a job (start-up time)
    from pipelines.tasks.text import grammaticality
    from rto.generation import decode_responses, encode_prompt, prompt_text, sample

    cfg = ctx.cfg.eval
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, device=ctx.device).eval()
    never = sampling_token_ids(tokenizer, model.config.get_text_config().vocab_size)["suppress_token_ids"]
    gt = ctx.prepared.ground_truth(prompt_only=True)
    rows = []
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    for batch in batches:
        ids = [encode_prompt(tokenizer, p) for p in batch]
        samples = sample(
            model, ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            suppress_token_ids=never,
        )  # fmt: skip
        texts = decode_responses(tokenizer, samples)
        terminated = samples.terminated(tokenizer.eos_token_id).tolist()
        scores = rm_scorer(samples) if rm_scorer is not None else [None] * len(texts)
        for prompt, text, done, score in zip(batch, texts, terminated, scores, strict=True):
            row = {
                "prompt": prompt_text(prompt),
                "response": text,
                "terminated": done,
                "length": len(text.split()),
            }
            if gt is not None:
                row["gt_reward"] = gt({"prompt": prompt}, text, done)
                row["grammatical"] = grammaticality(text)
            if score is not None:
                row["rm_score"] = float(score)
            rows.append(row)
    summary = {
        k: statistics.fmean(float(r[k]) for r in rows)
        for k in ("gt_reward", "grammatical", "terminated", "length", "rm_score")
        if k in rows[0]
    }
    summary["samples"] = len(rows)
    if "gt_reward" in rows[0]:
        summary["gt_se"] = standard_error([float(r["gt_reward"]) for r in rows])
    return {"summary": summary, "rows": rows}


def rm_scorer_for(ctx: StageContext, policy_tokenizer_path: str):
    """Score samples with the trained RM (same tokenizer as the policy), or None."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from reward.scoring import FrozenRM

    if not ctx.has_stage("rm"):
        return None

    rm = FrozenRM(str(ctx.run.stage_dir("rm")), device=ctx.device)

    def score(samples) -> list[float]:
        return rm.scores(samples.sequences, samples.attention_mask).tolist()

    return score


@no_grad
def evaluate_vision_policy(
    ctx: StageContext, path: str, records: list[dict], schedules: dict[str, dict[int, int]]
) -> dict[str, dict]:
    """Image task: answer each held-out question about its picture, once per entry of `schedules`
    (label -> vision-token pruning schedule, {} = dense); ground truth per record. The model is
    loaded and each batch of pictures encoded once for all of them."""
    # deferred: every stage module is imported to validate a job (start-up time)
    import torch

    from pipelines.tasks.image_data import encode_prompts, prompt_label, record_reward
    from prune.adaptinfer import generate_pruned
    from rto.generation import Samples, decode_responses

    cfg = ctx.cfg.eval
    processor = load_processor(path)
    model = load_vision_lm(path, device=ctx.device).eval()
    tokenizer = processor.tokenizer
    never = sampling_token_ids(tokenizer, model.config.get_text_config().vocab_size)["suppress_token_ids"]
    never = sorted(set(never) | {model.config.image_token_id})
    sampling = cfg.temperature > 0
    rows: dict[str, list[dict]] = {label: [] for label in schedules}
    generators = {label: torch.Generator(device=ctx.device).manual_seed(ctx.cfg.seed) for label in schedules}
    for start in range(0, len(records), cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        inputs = encode_prompts(processor, chunk, ctx.prepared.root)
        inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        prompt_len = inputs["input_ids"].shape[1]
        for label, schedule in schedules.items():
            out = generate_pruned(
                model, inputs, schedule, ctx.cfg.adaptinfer.method,
                max_new_tokens=cfg.max_new_tokens, do_sample=sampling,
                temperature=cfg.temperature if sampling else 1.0, top_p=cfg.top_p,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                generator=generators[label], suppress_token_ids=never,
            )  # fmt: skip
            samples = Samples(
                out.sequences.cpu(), torch.cat([inputs["attention_mask"].cpu(), out.response_mask.cpu()], 1),
                prompt_len, out.response_mask.cpu(), out.sampler_logprobs.cpu(),
            )  # fmt: skip
            texts = decode_responses(tokenizer, samples)
            terminated = samples.terminated(tokenizer.eos_token_id).tolist()
            for record, text, done in zip(chunk, texts, terminated, strict=True):
                rows[label].append(
                    {
                        "prompt": prompt_label(record),
                        "response": text,
                        "terminated": done,
                        "length": len(text.split()),
                        "gt_reward": record_reward(record, text, done),
                    }
                )
    results = {}
    for label, label_rows in rows.items():
        summary = {
            k: statistics.fmean(float(r[k]) for r in label_rows)
            for k in ("gt_reward", "terminated", "length")
        }
        summary["samples"] = len(label_rows)
        summary["gt_se"] = standard_error([float(r["gt_reward"]) for r in label_rows])
        results[label] = {"summary": summary, "rows": label_rows}
    return results


def pruning_schedule(ctx: StageContext, path: str) -> dict[int, int] | None:
    """The configured AdaptInfer schedule resolved for the policy at `path` (None when disabled)."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from prune.adaptinfer.rollout import resolve_for_model

    if not ctx.cfg.adaptinfer.enabled:
        return None

    return resolve_for_model(ctx.cfg.adaptinfer, path, field="adaptinfer")


@register_stage(
    "eval", rank=5, sections=("eval", "adaptinfer"), uses=("sft", "dpo", "rm", "ppo"),
    revision=1,  # 1: answers no longer drawn from HF's default top-k 50 (docs/real-models.md)
)  # fmt: skip
def run_eval(ctx: StageContext) -> dict:
    # deferred: every stage module is imported to validate a job (start-up time)
    import torch

    from rto.progress import make_progress

    if ctx.prepared.is_image_task:
        return run_image_eval(ctx)
    prompts = [r["prompt"] for r in ctx.prepared.records("eval_prompts")]
    prompts = [p for p in prompts for _ in range(ctx.cfg.eval.samples_per_prompt)]
    results = {}
    paths = policy_paths(ctx)
    with make_progress() as progress:
        task = progress.add_task("eval", total=len(paths), info="")
        for name, path in paths.items():
            torch.manual_seed(ctx.cfg.seed)
            progress.update(task, info=name)
            results[name] = keep_result(
                ctx, name, evaluate_policy(ctx, path, prompts, rm_scorer_for(ctx, path))
            )
            progress.advance(task)
    return finish(ctx, results, len(prompts))


def keep_result(ctx: StageContext, name: str, result: dict) -> dict:
    """Write one policy's samples to `samples-<name>.jsonl`; return its summary."""
    import json

    with open(ctx.out_dir / f"samples-{name}.jsonl", "w") as f:
        for row in result["rows"]:
            f.write(json.dumps(row) + "\n")
    return result["summary"]


def finish(ctx: StageContext, results: dict[str, dict], n_prompts: int) -> dict:
    for name, summary in results.items():
        ctx.log(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    summary = {"policies": results, "prompts": n_prompts, "base_policy": ctx.cfg.policy.path}
    if ctx.has_stage("ppo"):
        summary["ppo_reward_mode"] = (
            ctx.run.read_summary().get("ppo", {}).get("reward_mode", ctx.cfg.reward.mode)
        )
    return summary


def run_image_eval(ctx: StageContext) -> dict:
    """Held-out accuracy of each policy, dense and (when the adaptinfer section is enabled) with
    the rollouts' vision-token pruning, which tells how much of the policy's skill survives it."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from rto.progress import make_progress

    records = [
        r for r in ctx.prepared.records("eval_prompts") for _ in range(ctx.cfg.eval.samples_per_prompt)
    ]
    paths = policy_paths(ctx)
    results: dict[str, dict] = {}
    with make_progress() as progress:
        task = progress.add_task("eval", total=len(paths), info="")
        for name, path in paths.items():
            progress.update(task, info=name)
            schedules = {name: {}}
            schedule = pruning_schedule(ctx, path)
            if schedule:
                schedules[f"{name}+{ctx.cfg.adaptinfer.method}"] = schedule
            for label, result in evaluate_vision_policy(ctx, path, records, schedules).items():
                results[label] = keep_result(ctx, label, result)
            progress.advance(task)
    return finish(ctx, results, len(records))
