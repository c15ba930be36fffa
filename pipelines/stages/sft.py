"""`sft`: supervised fine-tuning of the base policy with TRL's SFTTrainer (text or vision-language)."""

from __future__ import annotations

from pipelines.stages import StageContext, register_stage
from rto.models import load_model, load_processor, load_tokenizer, load_vision_lm


@register_stage("sft", rank=0, sections=("sft",))
def run_sft(ctx: StageContext) -> dict:
    # deferred: every stage module is imported to validate a job (start-up time)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipelines.training import ProgressCallback, trainer_kwargs

    cfg = ctx.cfg
    base = ctx.prepared.model("policy")
    if ctx.prepared.is_image_task:
        return run_image_sft(ctx, base)
    tokenizer = load_tokenizer(base, field="policy.path")
    records = ctx.prepared.records("sft")
    args = SFTConfig(**trainer_kwargs(cfg, cfg.sft, ctx.out_dir, ctx.device), packing=False)
    trainer = SFTTrainer(
        model=load_model(base, "causal_lm", field="policy.path"),  # its embeddings cover the pad token
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[ProgressCallback("sft", ctx.metrics)],
    )
    return train_and_save(trainer, tokenizer, ctx, len(records))


def run_image_sft(ctx: StageContext, base: str) -> dict:
    """SFT of a vision-language policy: TRL's SFTTrainer with the image task's collator (pictures
    through the processor, loss on the answer and EOS)."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipelines.tasks.image_data import SFTCollator
    from pipelines.training import ProgressCallback, trainer_kwargs

    cfg = ctx.cfg
    model = load_vision_lm(base, field="policy.path")
    processor = load_processor(base, field="policy.path")
    records = ctx.prepared.records("sft")
    args = SFTConfig(
        **trainer_kwargs(cfg, cfg.sft, ctx.out_dir, ctx.device),
        packing=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    args.max_length = None  # the collator builds whole examples (image tokens must not be cut)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=processor,
        data_collator=SFTCollator(processor, ctx.prepared.root),
        callbacks=[ProgressCallback("sft", ctx.metrics)],
    )
    return train_and_save(trainer, processor, ctx, len(records))


def train_and_save(trainer, processing_class, ctx: StageContext, n_examples: int) -> dict:
    # deferred: every stage module is imported to validate a job (start-up time)
    from pipelines.training import quiet, save_model

    result = quiet(trainer).train()
    save_model(trainer, processing_class, ctx.out_dir)
    return {
        "train_loss": float(result.training_loss),
        "examples": n_examples,
        "steps": int(result.global_step),
    }
