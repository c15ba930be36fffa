"""`AdaptInferConfig`: the pydantic model the top-level config mounts (e.g. under ``rollout.pruning``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from prune.adaptinfer.schedule import PRESETS, proportional_schedule
from rto.errors import UserError
from rto.schema import Section, Seed

Method = Literal["adaptinfer", "adaptinfer_no_prior", "fastv", "random"]


class AdaptInferConfig(Section):
    """Vision-token pruning for rollouts of a vision-language policy.

    Give exactly one of `preset`, `schedule` or `keep_ratio`; the schedule is resolved against the
    model (number of decoder layers and vision tokens) by `resolve`.
    """

    enabled: bool = Field(True, description="Prune during rollouts; False generates densely.")
    method: Method = Field(
        "adaptinfer",
        description="Vision-token scorer: adaptinfer (text-prior weighted attention, the paper), "
        "adaptinfer_no_prior (ablation), fastv (attention received), random (baseline).",
    )
    preset: str | None = Field(
        None, description=f"A paper schedule for LLaVA-1.5-7B-shaped models: one of {sorted(PRESETS)}."
    )
    schedule: dict[int, int] | None = Field(
        None, description="Explicit schedule: 0-based decoder layer -> vision tokens kept after it."
    )
    keep_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Mean fraction of vision tokens per decoder layer; the schedule keeps the paper's "
        "shape (cuts at 1/32, 10/32, 20/32 of depth, counts 133:27:3).",
    )
    seed: Seed = Field(0, description="Seed of the random baseline's scores.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(PRESETS))}")
        return value

    @field_validator("schedule")
    @classmethod
    def _monotone(cls, value: dict[int, int] | None) -> dict[int, int] | None:
        if value is None:
            return None
        steps = sorted(value.items())
        if any(layer < 0 or keep < 0 for layer, keep in steps):
            raise ValueError("layers and kept counts must be >= 0")
        if any(b[1] > a[1] for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("kept counts must not grow with depth (pruned tokens do not come back)")
        return dict(steps)

    @model_validator(mode="after")
    def _one_source(self) -> AdaptInferConfig:
        given = [name for name in ("preset", "schedule", "keep_ratio") if getattr(self, name) is not None]
        if self.enabled and len(given) != 1:
            raise ValueError(f"give exactly one of preset, schedule, keep_ratio (got {given or 'none'})")
        return self

    def resolve(self, n_layers: int, n_vision: int) -> dict[int, int]:
        """The concrete schedule for a model with `n_layers` decoder layers and `n_vision` image tokens."""
        if not self.enabled:
            return {}
        if self.keep_ratio is not None:
            return proportional_schedule(n_layers, n_vision, self.keep_ratio * n_vision)
        schedule = PRESETS[self.preset] if self.preset is not None else self.schedule
        from prune.adaptinfer.engine import check_schedule  # deferred: torch; the job schema loads without it

        try:
            return dict(check_schedule(schedule, n_layers, n_vision))
        except UserError as error:
            raise UserError(
                str(error).removeprefix("schedule: "),
                field=f"preset {self.preset}" if self.preset else "schedule",
            ) from None
