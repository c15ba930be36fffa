"""Settings of the `ftp` stage (mounted as the `ftp` section of the job file).

Token sparsity is the fraction of (token, block) pairs that skip their block in prefill; the
global `sparsity` is the mean of the per-block sparsities the scheduler picks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rto.errors import FieldError
from rto.schema import Section, Seed

_Section = Section


class FTPSearchConfig(_Section):
    """Genetic search over per-block sparsities under the global budget."""

    population: int = Field(12, ge=2, description="Schedules per generation")
    generations: int = Field(8, ge=1, description="Generations of the search")
    elite: int = Field(2, ge=1, description="Best schedules copied unchanged into the next generation")
    mutation_std: float = Field(
        0.1, gt=0, description="Std of the Gaussian mutation of each block's sparsity"
    )
    calib_samples: int = Field(
        32, ge=1, description="Calibration sequences that score a schedule (KL to dense)"
    )
    research_after_training: bool = Field(True, description="Search again, scored with the trained router")

    @model_validator(mode="after")
    def _elite_fits(self) -> FTPSearchConfig:
        if self.elite >= self.population:
            raise FieldError("elite", f"({self.elite}) must be smaller than population ({self.population})")
        return self


class FTPTrainConfig(_Section):
    """Router training with the LLM frozen."""

    steps: int = Field(300, ge=1, description="Optimizer steps")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    max_length: int = Field(128, ge=4, description="Training sequences are truncated to this many tokens")
    guide_weight: float = Field(
        1.0, ge=0, description="Initial weight of the guide loss (follow the static router)"
    )
    guide_decay: float = Field(0.9, gt=0, le=1, description="Guide weight multiplier per step")
    sparsity_weight: float = Field(1.0, ge=0, description="Weight of sum_i max(s_target_i - s_actual_i, 0)")
    distill_weight: float = Field(1.0, ge=0, description="Weight of KL(dense || pruned) at the final block")
    gumbel_tau: float = Field(1.0, gt=0, description="Temperature of the Gumbel-sigmoid relaxation")


class FTPConfig(_Section):
    """FTP: learned token routing for cheaper rollouts (docs/ftp.md)."""

    sparsity: float = Field(0.3, description="Global token sparsity target, in [0, 1)")
    max_block_sparsity: float = Field(0.8, description="Upper bound on any one block's sparsity, in (0, 1)")
    router: str = Field(
        "learned", description="'learned' (train the MLP router) or 'static' (bootstrap router only)"
    )
    router_hidden: int = Field(64, ge=1, description="Width of the router MLP (4 -> hidden -> 2)")
    decode_threshold: float | Literal["calibrated"] = Field(
        0.0,
        description="Decode rule: a decoded token computes a block when p(keep) > threshold. 0 (default) computes "
        "every decoded token (prefill-only pruning: the measured best quality, and batched decode gains no speed "
        "from skipping); 0.5 is the paper's rule; 'calibrated' picks per-block thresholds so that greedily decoded "
        "calibration tokens skip at the block's target sparsity (experimental: it can miss badly under sampling)",
    )
    calib_decode_tokens: int = Field(
        32, ge=1, description="Tokens decoded per calibration prompt for 'calibrated'"
    )
    attention_probes: int = Field(
        8, ge=1, description="Latest tokens whose attention updates the attention table"
    )
    seed: Seed = 0
    search: FTPSearchConfig = Field(default_factory=FTPSearchConfig)
    train: FTPTrainConfig = Field(default_factory=FTPTrainConfig)

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {v}")
        return v

    @field_validator("max_block_sparsity")
    @classmethod
    def _open_unit(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"max_block_sparsity must be in (0, 1), got {v}")
        return v

    @field_validator("decode_threshold")
    @classmethod
    def _threshold(cls, v):
        if isinstance(v, (int, float)) and not 0 <= v < 1:
            raise ValueError(f"decode_threshold must be in [0, 1) or 'calibrated', got {v}")
        return v

    @field_validator("router")
    @classmethod
    def _router(cls, v: str) -> str:
        if v not in ("learned", "static"):
            raise ValueError(f"router must be 'learned' or 'static', got {v!r}")
        return v

    @model_validator(mode="after")
    def _budget_reachable(self) -> FTPConfig:
        if self.sparsity > self.max_block_sparsity:
            raise FieldError(
                "sparsity",
                f"sparsity {self.sparsity} cannot be reached with max_block_sparsity {self.max_block_sparsity}",
            )
        return self
