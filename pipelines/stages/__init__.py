"""Stage registry: a stage is one module here with one function `run(ctx) -> summary` behind
`@register_stage`; the modules are found by name, and the order stages run in is derived from what
each one uses (an earlier stage's output), so adding a stage touches nothing else.

A stage declares the config sections its result depends on (for the cache hash), the stages whose
outputs it may use, and its `rank` among stages that do not depend on each other. Validating a job
imports every stage module, so they import their libraries inside the stage function.

`needs(cfg)` narrows `uses` to what a given job's settings really read (the `rm` stage reads the
SFT model only with `rm.init: sft`): a stage whose needs are met may run beside an earlier one
(`pipelines.runner`).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rto.config import Config
from rto.errors import UserError
from rto.rundir import RunDir

if TYPE_CHECKING:  # the data preparation is imported where a run prepares data
    from pipelines.prepare import Prepared


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[[StageContext], dict]
    sections: tuple[str, ...]
    uses: tuple[str, ...]
    rank: int
    needs: Callable[[Config], tuple[str, ...]] | None = None
    revision: int = 0

    def needs_of(self, cfg: Config) -> tuple[str, ...]:
        """The earlier stages whose output this job's run of the stage reads (`uses` unless narrowed)."""
        return self.uses if self.needs is None else self.needs(cfg)


STAGES: dict[str, StageSpec] = {}


def register_stage(
    name: str,
    *,
    rank: int,
    sections: tuple[str, ...] = (),
    uses: tuple[str, ...] = (),
    needs: Callable[[Config], tuple[str, ...]] | None = None,
    revision: int = 0,
) -> Callable:
    """`sections`: dotted config paths the output depends on; `uses`: earlier stages it may read;
    `rank`: its place among stages that do not depend on each other (lower runs first); `needs`:
    the part of `uses` a job's settings really read (default: all of it); `revision`: raised when
    a fix changes what the stage computes from the same settings, so that outputs cached before it
    are made again (part of the cache key from 1)."""

    def decorator(fn: Callable[[StageContext], dict]) -> Callable[[StageContext], dict]:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        STAGES[name] = StageSpec(name, fn, sections, uses, rank, needs, revision)
        return fn

    return decorator


def stages() -> dict[str, StageSpec]:
    """Every stage: the modules of this package, imported once."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return STAGES


@functools.cache
def stage_order() -> tuple[str, ...]:
    """The stages in the order they run: each after every stage it uses, ties by rank."""
    specs = stages()
    order: list[str] = []
    waiting = dict(specs)
    while waiting:
        ready = [s for s in waiting.values() if all(u in order or u not in specs for u in s.uses)]
        if not ready:
            raise ValueError(f"stages use each other in a cycle: {sorted(waiting)}")
        first = min(ready, key=lambda s: (s.rank, s.name))
        order.append(first.name)
        del waiting[first.name]
    return tuple(order)


def no_grad(fn: Callable) -> Callable:
    """`torch.no_grad()` as a decorator that imports torch only when the function runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch  # deferred: stage modules load without torch (a job is validated without it)

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class StageContext:
    name: str
    cfg: Config
    run: RunDir
    out_dir: Path
    prepared: Prepared
    resume: bool = False
    device: str = "cpu"
    log: Callable[[str], None] = print
    extras: dict = field(default_factory=dict)
    metrics_to: Callable[[dict], None] | None = None  # instead of the run's metrics.jsonl

    def has_stage(self, name: str) -> bool:
        return self.run.is_done(name)

    def stage_dir(self, name: str) -> Path:
        """A finished earlier stage's output folder."""
        if not self.run.is_done(name):
            raise UserError(
                f"stage '{self.name}' needs the output of stage '{name}', which has not run in this run directory; "
                f"add '{name}' to stages",
                source=str(self.run.config_path),
                field="stages",
            )
        return self.run.stage_dir(name)

    def policy_init(self) -> str:
        """Where the policy starts: the SFT output if there is one, else the configured base model."""
        if self.has_stage("sft"):
            return str(self.run.stage_dir("sft"))
        return self.prepared.model("policy")

    def metrics(self, record: dict) -> None:
        record = {"stage": self.name, **record}
        if self.metrics_to is not None:
            self.metrics_to(record)
        else:
            self.run.append_metrics(record)
