"""`rm`: a sentence-level reward model on the preference pairs (TRL's RewardTrainer).

Beside the model it saves `normalization.json`: the mean and std of its scores over the training
responses, which the token reward uses to normalise the RM score.

The pairs are tokenized here, as rollouts are laid out (the prompt ready for generation, then the
response up to and including EOS; chat-template text after EOS, such as ChatML's newline, cut), and
the tokenizer has a pad token distinct from EOS: TRL's pooling (the rightmost token that is not the
pad) then trains the score on the EOS, the very token `rto.forward.sequence_scores` reads.
"""

from __future__ import annotations

from pipelines.stages import StageContext, register_stage
from rto.models import load_model, load_tokenizer
from rto.rundir import atomic_write_json

NORMALIZATION_FILE = "normalization.json"


def rm_init(ctx: StageContext) -> str:
    if ctx.cfg.rm.init == "sft":
        return ctx.policy_init()
    return ctx.prepared.model("reward_model")


def _needs(cfg) -> tuple[str, ...]:
    return ("sft",) if cfg.rm.init == "sft" else ()


@register_stage("rm", rank=2, sections=("rm",), uses=("sft",), needs=_needs)
def run_rm(ctx: StageContext) -> dict:
    # deferred: every stage module is imported to validate a job (start-up time)
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from pipelines.pairs import encode_pairs, rm_scores
    from pipelines.training import ProgressCallback, quiet, save_model, trainer_kwargs
    from reward.scoring import FrozenRM

    cfg = ctx.cfg
    init = rm_init(ctx)
    tokenizer = load_tokenizer(init, field="reward_model.path")
    pairs = ctx.prepared.records("pairs")
    encoded = encode_pairs(tokenizer, pairs)
    args = RewardConfig(**trainer_kwargs(cfg, cfg.rm, ctx.out_dir, ctx.device))
    trainer = RewardTrainer(
        model=load_model(init, "sequence_classification", field="reward_model.path"),
        args=args,
        train_dataset=Dataset.from_list(tokenized_pairs(tokenizer, pairs, encoded)),
        processing_class=tokenizer,
        callbacks=[ProgressCallback("rm", ctx.metrics)],
    )
    result = quiet(trainer).train()
    save_model(trainer, tokenizer, ctx.out_dir)

    rm = FrozenRM(str(ctx.out_dir), device=ctx.device)
    chosen, rejected = (side[:2000] for side in encoded)  # the normalisation's responses
    train_scores = torch.cat([rm_scores(rm, tokenizer, chosen), rm_scores(rm, tokenizer, rejected)])
    mean, std = float(train_scores.mean()), float(train_scores.std().clamp_min(1e-6))
    atomic_write_json(
        ctx.out_dir / NORMALIZATION_FILE, {"mean": mean, "std": std, "n": int(train_scores.numel())}
    )
    summary = {
        "train_loss": float(result.training_loss),
        "pairs": len(pairs),
        "score_mean": mean,
        "score_std": std,
    }
    if "eval_pairs" in ctx.prepared.data:
        chosen, rejected = encode_pairs(tokenizer, ctx.prepared.records("eval_pairs"))
        summary["rm_pair_accuracy"] = float(
            (rm_scores(rm, tokenizer, chosen) > rm_scores(rm, tokenizer, rejected)).float().mean()
        )
    return summary


def tokenized_pairs(tokenizer, pairs: list[dict], encoded=None) -> list[dict]:
    """TRL's pre-tokenized preference rows (`chosen_ids`, `rejected_ids`): prompt + response ids
    exactly as a rollout lays them out, ending at EOS (`rto.generation.encode_completion`).
    `encoded`: `encode_pairs(tokenizer, pairs)` where the caller has it already."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from pipelines.pairs import encode_pairs

    chosen, rejected = encoded if encoded is not None else encode_pairs(tokenizer, pairs)
    return [
        {"chosen_ids": p + c, "rejected_ids": q + r} for (p, c), (q, r) in zip(chosen, rejected, strict=True)
    ]


def load_normalization(rm_dir) -> tuple[float, float]:
    import json
    from pathlib import Path

    info = json.loads((Path(rm_dir) / NORMALIZATION_FILE).read_text())
    return info["mean"], info["std"]
