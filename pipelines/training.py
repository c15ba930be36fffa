"""Shared settings for the TRL trainers of the sft, dpo and rm stages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.progress import Progress
from transformers import TrainerCallback

from rto.config import Config, TrainConfig
from rto.progress import make_progress


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


class ProgressCallback(TrainerCallback):
    """Shows a rich progress bar for a HF/TRL trainer and appends its logs to metrics.jsonl."""

    def __init__(self, description: str, log_metrics: Callable[[dict], None] | None = None):
        self.description = description
        self.log_metrics = log_metrics
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = make_progress()
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if self.progress is not None and "loss" in logs:
            self.progress.update(self.task, info=f"loss {logs['loss']:.4f}")
        if self.log_metrics is not None and logs:
            self.log_metrics({"step": state.global_step, **logs})

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
