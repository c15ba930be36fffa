"""`eval`: sample each available policy on held-out prompts and score the responses with the task's
ground truth (where it has one) and the reward model (where one was trained)."""

from __future__ import annotations

import statistics

import torch

from pipelines.stages import StageContext, register_stage
from rto.generation import decode_responses, encode_prompt, prompt_text, sample
from rto.models import load_causal_lm, load_tokenizer
from rto.progress import make_progress


def policy_paths(ctx: StageContext) -> dict[str, str]:
    candidates = {
        "base": ctx.prepared.model("policy"),
        "sft": ctx.run.stage_dir("sft") if ctx.has_stage("sft") else None,
        "dpo": ctx.run.stage_dir("dpo") if ctx.has_stage("dpo") else None,
        "ppo": ctx.run.stage_dir("ppo") / "policy" if ctx.has_stage("ppo") else None,
    }
    return {name: str(candidates[name]) for name in ctx.cfg.eval.models if candidates.get(name)}


def evaluate_policy(ctx: StageContext, path: str, prompts: list, rm_scorer=None) -> dict:
    cfg = ctx.cfg.eval
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, device=ctx.device).eval()
    gt = ctx.prepared.ground_truth()
    rows = []
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    for batch in batches:
        ids = [encode_prompt(tokenizer, p) for p in batch]
        samples = sample(
            model, ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
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
                from pipelines.tasks.text import grammaticality

                row["gt_reward"] = gt(row["prompt"], text, done)
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
    return {"summary": summary, "rows": rows}


def rm_scorer_for(ctx: StageContext, policy_tokenizer_path: str):
    """Score samples with the trained RM (same tokenizer as the policy), or None."""
    if not ctx.has_stage("rm"):
        return None
    from reward.scoring import FrozenRM

    rm = FrozenRM(str(ctx.run.stage_dir("rm")), device=ctx.device)

    def score(samples) -> list[float]:
        return rm.scores(samples.sequences, samples.attention_mask).tolist()

    return score


@register_stage("eval", sections=("eval",), uses=("sft", "dpo", "rm", "ppo"))
def run_eval(ctx: StageContext) -> dict:
    import json

    prompts = [r["prompt"] for r in ctx.prepared.records("eval_prompts")]
    prompts = [p for p in prompts for _ in range(ctx.cfg.eval.samples_per_prompt)]
    results = {}
    paths = policy_paths(ctx)
    with make_progress() as progress:
        task = progress.add_task("eval", total=len(paths), info="")
        for name, path in paths.items():
            torch.manual_seed(ctx.cfg.seed)
            progress.update(task, info=name)
            result = evaluate_policy(ctx, path, prompts, rm_scorer_for(ctx, path))
            results[name] = result["summary"]
            with open(ctx.out_dir / f"samples-{name}.jsonl", "w") as f:
                for row in result["rows"]:
                    f.write(json.dumps(row) + "\n")
            progress.advance(task)
    for name, summary in results.items():
        ctx.log(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    summary = {"policies": results, "prompts": len(prompts)}
    if "ppo" in results:
        summary["ppo_reward_mode"] = (
            ctx.run.read_summary().get("ppo", {}).get("reward_mode", ctx.cfg.reward.mode)
        )
    return summary
