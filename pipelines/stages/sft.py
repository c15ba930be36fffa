"""`sft`: supervised fine-tuning of the base policy with TRL's SFTTrainer."""

from __future__ import annotations

from datasets import Dataset

from pipelines.stages import StageContext, register_stage
from pipelines.training import quiet, save_model, trainer_kwargs
from rto.models import load_tokenizer
from rto.progress import ProgressCallback


@register_stage("sft", sections=("sft",))
def run_sft(ctx: StageContext) -> dict:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.cfg
    base = ctx.prepared.model("policy")
    tokenizer = load_tokenizer(base, field="policy.path")
    records = ctx.prepared.records("sft")
    args = SFTConfig(**trainer_kwargs(cfg, cfg.sft, ctx.out_dir, ctx.device), packing=False)
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[ProgressCallback("sft", ctx.metrics)],
    )
    result = quiet(trainer).train()
    save_model(trainer, tokenizer, ctx.out_dir)
    return {
        "train_loss": float(result.training_loss),
        "examples": len(records),
        "steps": int(result.global_step),
    }
