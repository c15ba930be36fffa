"""Shared settings for the TRL trainers of the sft, dpo and rm stages."""

from __future__ import annotations

from pathlib import Path

from rto.config import Config, TrainConfig


def trainer_kwargs(cfg: Config, train: TrainConfig, out_dir: Path, device: str) -> dict:
    """Keyword arguments common to SFTConfig, DPOConfig and RewardConfig."""
    return dict(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type="cosine",
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        activation_checkpointing=train.gradient_checkpointing,  # transformers 5 name; TRL defaults it on
        max_length=train.max_length,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=cfg.dtype == "bfloat16",
        fp16=cfg.dtype == "float16",
        seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def quiet(trainer):
    """Drop the trainer's plain-text log printer: our ProgressCallback shows progress instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def save_model(trainer, tokenizer, out_dir: Path) -> None:
    """Save the trained model and its tokenizer as an ordinary HF folder; drop trainer scratch."""
    import shutil

    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
