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


SPARE_CORE_ENV = "RTO_SPARE_CORE"
"""`1`: take a spare core whatever other processes do; `0`: never (one stream of work, as before);
unset: where `spare_cores()` finds one idle."""


def spare_cores() -> bool:
    """Whether a second stream of single-threaded work (a thread or a child process beside this
    one) would find an idle core: this process's torch threads leave one of its CPUs free (the
    quickstart: one thread on two cores), and other processes at normal priority do not keep it
    busy (`others_busy`; niced work, such as Ray's workers, gives way anyway). Work split over
    threads or processes, each running whole forward passes, keeps every op on one thread: the
    results are the same bits either way; only the time differs."""
    import os

    import torch

    setting = os.environ.get(SPARE_CORE_ENV, "").strip().lower()
    if setting in ("0", "no", "false"):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    threads = torch.get_num_threads()
    if cpus < 2 * threads:
        return False
    if setting in ("1", "yes", "true"):
        return True
    others = others_busy()
    return others is None or others <= cpus - 2 * threads + 0.5


_last_sample: tuple[float, float, float] | None = None
_last_others: float | None = None


def others_busy(fresh_after: float = 5.0) -> float | None:
    """Cores that other processes kept busy at normal priority (not niced) since the last call
    (/proc/stat's user, system, irq and steal time less this process's CPU time); measured over
    0.2 s instead when that was long ago (`fresh_after` seconds) or never. None where the kernel
    does not report it."""
    import os
    import time

    global _last_sample, _last_others

    def sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                user, _nice, system, _idle, _iowait, irq, softirq, steal = (
                    int(x) for x in f.readline().split()[1:9]
                )
        except (OSError, ValueError):
            return None
        busy = (user + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return time.monotonic(), busy, time.process_time()

    now = sample()
    if now is None:
        return None
    if _last_sample is None or now[0] - _last_sample[0] > fresh_after:
        time.sleep(0.2)
        _last_sample, now = now, sample()
    elapsed = now[0] - _last_sample[0]
    if elapsed >= 0.2 or _last_others is None:
        ours = now[2] - _last_sample[2] if os.getpriority(os.PRIO_PROCESS, 0) <= 0 else 0.0
        _last_others = max(0.0, (now[1] - _last_sample[1] - ours) / elapsed)
        _last_sample = now
    return _last_others


def in_thread(fn: Callable, *args, **kwargs):
    """Run `fn` on a new thread with this thread's torch thread count (OpenMP and MKL read it per
    thread) and grad mode; returns a `concurrent.futures.Future`."""
    import concurrent.futures
    import threading

    import torch

    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        torch.set_num_threads(threads)
        try:
            with torch.set_grad_enabled(grad):
                future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever waits for the result
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="rto-overlap").start()
    return future


def dpo_trainer_class():
    """TRL's DPOTrainer, with the reference model's forward of each training batch run on a second
    thread while the policy's forward runs (where `spare_cores()`; otherwise TRL's own order).

    The reference forward is the one TRL makes (same model, inputs, labels and settings, under
    `no_grad`), only started earlier: `_compute_loss` asks the stand-in for it and gets its result,
    or, should TRL ask for anything else, a forward of what it asked. Same loss, same bits."""
    import torch
    from trl import DPOTrainer

    # the keyword arguments of TRL's reference call in `DPOTrainer._compute_loss`
    non_model_keys = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")

    def reference_kwargs(inputs: dict) -> dict:
        kwargs = {k: v for k, v in inputs.items() if k not in non_model_keys}
        kwargs["use_cache"] = False
        kwargs["labels"] = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        kwargs["fused_lm_head"] = True
        return kwargs

    def same(a: dict, b: dict) -> bool:
        def equal(x, y) -> bool:
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                return (
                    isinstance(x, torch.Tensor)
                    and isinstance(y, torch.Tensor)
                    and (x is y or (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)))
                )
            return x == y

        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)

    class StartedReference:
        """The reference model for one `compute_loss`: its forward of the batch already started."""

        def __init__(self, model, kwargs: dict, future):
            self.model, self.kwargs, self.future = model, kwargs, future

        def __call__(self, *args, **kwargs):
            result = self.future.result()  # also: the helper is done with the model
            if not args and same(kwargs, self.kwargs):
                return result
            return self.model(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.model, name)

    class OverlappingDPOTrainer(DPOTrainer):
        overlapped = 0  # batches whose reference forward ran beside the policy's

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ref = self.ref_model
            if (
                ref is None
                or self.precompute_ref_logps
                or self.aux_loss_enabled
                or self.args.device.type != "cpu"
                or not isinstance(inputs, dict)
                or "completion_mask" not in inputs
                or not spare_cores()
            ):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            kwargs = reference_kwargs(inputs)

            def forward():
                with torch.no_grad(), self.compute_loss_context_manager():
                    return ref(**kwargs)

            self.ref_model = StartedReference(ref, kwargs, in_thread(forward))
            self.overlapped += 1
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.ref_model.future.exception()  # never leave the helper running on the model
                self.ref_model = ref

    return OverlappingDPOTrainer
