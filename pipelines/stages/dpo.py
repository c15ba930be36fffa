"""`dpo`: DPO from the SFT model on preference pairs (TRL's DPOTrainer). Output: π_dpo."""

from __future__ import annotations

import torch
from datasets import Dataset

from pipelines.pairs import encode_pairs, logprob_sums
from pipelines.stages import StageContext, register_stage
from pipelines.training import quiet, save_model, trainer_kwargs
from rto.models import load_tokenizer
from rto.progress import ProgressCallback


def preference_figures(
    policy_path: str, ref_path: str, tokenizer, pairs: list[dict], beta: float, device: str
) -> dict:
    """Held-out pairs: how often the reference (SFT) model and the DPO model prefer the chosen
    response, and how often DPO's implicit reward β·log π/π_ref ranks it first.

    "Prefers" compares the mean log-likelihood per token (chosen responses are longer on average,
    which alone lowers their total log-likelihood); the raw totals are reported too."""
    from reward.scoring import FrozenLM

    chosen, rejected = encode_pairs(tokenizer, pairs)
    len_c = torch.tensor([len(c) for _, c in chosen], dtype=torch.float32)
    len_r = torch.tensor([len(c) for _, c in rejected], dtype=torch.float32)
    policy, ref = FrozenLM(policy_path, device=device), FrozenLM(ref_path, device=device)
    pc, pr = logprob_sums(policy, tokenizer, chosen), logprob_sums(policy, tokenizer, rejected)
    rc, rr = logprob_sums(ref, tokenizer, chosen), logprob_sums(ref, tokenizer, rejected)
    margin = beta * ((pc - rc) - (pr - rr))

    def rate(x: torch.Tensor) -> float:
        return float(x.float().mean())

    return {
        "ref_prefers_chosen": rate(rc / len_c > rr / len_r),
        "dpo_prefers_chosen": rate(pc / len_c > pr / len_r),
        "ref_prefers_chosen_total_logprob": rate(rc > rr),
        "dpo_prefers_chosen_total_logprob": rate(pc > pr),
        "dpo_reward_accuracy": rate(margin > 0),
        "dpo_reward_margin": float(margin.mean()),
    }


@register_stage("dpo", sections=("dpo",), uses=("sft",))
def run_dpo(ctx: StageContext) -> dict:
    from trl import DPOConfig, DPOTrainer

    cfg = ctx.cfg
    init = ctx.policy_init()
    tokenizer = load_tokenizer(init)
    pairs = ctx.prepared.records("pairs")
    args = DPOConfig(
        **trainer_kwargs(cfg, cfg.dpo, ctx.out_dir, ctx.device),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
    )
    trainer = DPOTrainer(
        model=init,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[ProgressCallback("dpo", ctx.metrics)],
    )
    result = quiet(trainer).train()
    save_model(trainer, tokenizer, ctx.out_dir)
    summary = {
        "train_loss": float(result.training_loss),
        "pairs": len(pairs),
        "steps": int(result.global_step),
    }
    if "eval_pairs" in ctx.prepared.data:
        held_out = ctx.prepared.records("eval_pairs")
        summary.update(
            preference_figures(str(ctx.out_dir), init, tokenizer, held_out, cfg.dpo.beta, ctx.device)
        )
        gt = ctx.prepared.ground_truth()
        if gt is not None:
            summary["label_agrees_with_gt"] = _label_agreement(held_out, gt)
    return summary


def _label_agreement(pairs: list[dict], gt) -> float:
    from rto.generation import prompt_text

    def content(x):
        return x if isinstance(x, str) else x[-1]["content"]

    agree = [
        gt(prompt_text(p["prompt"]), content(p["chosen"]))
        > gt(prompt_text(p["prompt"]), content(p["rejected"]))
        for p in pairs
    ]
    return sum(agree) / len(agree)
