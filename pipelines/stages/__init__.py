"""Stage registry: a stage is one function `run(ctx) -> summary` behind `@register_stage`.

A stage declares the config sections its result depends on (for the cache hash) and the earlier
stages whose outputs it may use. Importing this package registers the built-in stages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rto.config import Config
from rto.errors import UserError
from rto.rundir import RunDir


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[[StageContext], dict]
    sections: tuple[str, ...]
    uses: tuple[str, ...]


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, *, sections: tuple[str, ...] = (), uses: tuple[str, ...] = ()) -> Callable:
    """`sections`: dotted config paths the output depends on; `uses`: earlier stages it may read."""

    def decorator(fn: Callable[[StageContext], dict]) -> Callable[[StageContext], dict]:
        STAGES[name] = StageSpec(name, fn, sections, uses)
        return fn

    return decorator


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
        self.run.append_metrics({"stage": self.name, **record})


from pipelines.prepare import Prepared  # noqa: E402

for _module in ("sft", "dpo", "rm", "ftp", "ppo", "eval"):
    try:
        importlib.import_module(f"pipelines.stages.{_module}")
    except ModuleNotFoundError as exc:  # a stage whose module is not part of this install
        if exc.name != f"pipelines.stages.{_module}":
            raise
