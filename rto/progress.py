"""Progress bars (rich) for long work; the trainers' callback is `pipelines.training.ProgressCallback`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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

T = TypeVar("T")


LOG_FILE = "rto.log"
"""Where a run's library output goes (in its run directory) unless --verbose."""
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "trl", "accelerate", "deepspeed", "DeepSpeed",
                   "ray", "torch", "urllib3", "filelock", "fsspec", "py.warnings")  # fmt: skip
_verbose = False
_handler = None


def verbose() -> bool:
    """Whether library output goes to the console (`--verbose`) rather than the run's log file."""
    return _verbose


def library_output(log_file, show: bool = False) -> None:
    """Quiet by default: the console shows rto's progress and results; warnings and the libraries'
    log records (transformers, TRL, DeepSpeed, Ray, ...) go to `log_file`, and Ray does not forward
    its workers' output (`verbose()` is read by `init_ray`). With `show`, everything goes to the
    console as the libraries print it."""
    import logging

    global _verbose, _handler
    _verbose = show
    quiet_libraries()
    if show:
        return
    _handler = logging.FileHandler(log_file, encoding="utf-8")
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    route_library_logs()


def route_library_logs() -> None:
    """(Again) send the libraries' log records to the run's log file: a library that installs its
    own console handler when it is imported (Ray does) is rerouted by calling this after the import."""
    import logging

    if _handler is None:
        return
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers = [_handler]
        library.propagate = False
        library.setLevel(logging.INFO if name == "ray" else logging.WARNING)


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
