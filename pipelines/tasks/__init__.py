"""The built-in tasks behind one interface (`Task`): the data and tokenizer a task makes, its ground
truth, and what it does to external data of its kind. Data preparation and the stages ask the task
named in the job (`task(name)`); the PPO loop sees only prompts and a ground-truth function.

A task is one module here that registers a `Task` object with `TASKS.register(name)`; its settings
are the job schema's `task` section of that name (`rto.config`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from rto.registry import Registry


class Task(Protocol):
    name: str
    uses_reward_model: bool  # whether the job's reward_model is prepared (a task may have no rm stage)
    prompt_only: bool  # whether its ground truth needs nothing of a record but the prompt

    def build(self, settings: Any, folder: Path) -> tuple[dict[str, list[dict]], Any]:
        """The task's records by role (sft, pairs, eval_pairs, prompts, eval_prompts) and the tokenizer
        or processor its built-in models use (saved beside the data); may write files to `folder`."""
        ...

    def external(self, records: list[dict], role: str, source: str, folder: Path) -> list[dict]:
        """External data of this task, checked and made self-contained in the prepared `folder`."""
        ...

    def record_reward(self, record: dict, response: str, terminated: bool) -> float:
        """The ground truth of a response to a prompt record (`rto.ppo.trainer.GroundTruth`)."""
        ...


TASKS: Registry[Task] = Registry("task")
_MODULES = {"text": "pipelines.tasks.text", "image": "pipelines.tasks.image_data"}


def task(name: str) -> Task:
    """The task registered as `name` (its module imported on first use)."""
    if name not in TASKS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    return TASKS.get(name)
