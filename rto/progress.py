"""Progress bars (rich) and metric logging for long work, including a HF Trainer callback."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

T = TypeVar("T")


def quiet_libraries() -> None:
    """rto shows its own progress bars; the libraries' per-call bars only clutter the log.
    (Environment defaults, so a user's own settings win; Ray workers inherit them.)"""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


console = Console(stderr=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    with make_progress() as progress:
        task = progress.add_task(description, total=total if total is not None else len(items), info="")  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)


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
