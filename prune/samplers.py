"""Rollout samplers by name: `ppo.rollout_pruner` picks one, and the job schema checks the name
and what the sampler needs against this registry. A sampler is one module, `prune/<name>/rollout.py`,
with one `@register_sampler` function that builds it; the modules are found here, so adding one
touches nothing else.

    @register_sampler("ftp", policies="text", stage="ftp")
    def ftp_sampler(job, policy: str, stage_dir: Path | None) -> Sampler: ...

`build(job, policy, stage_dir)` returns an `rto.generation.Sampler` (sent to the rollout workers),
or None for the dense policy's own `generate`. `policies` is "text", "vision" or "any"; `stage` is
the stage whose output the sampler reads; `check(job)` returns a config error for this sampler, as
(field, message), or None. `shares_weights`: the sampler generates with the model it is given (the
dense policy's weights, which `resources.colocate: all` shares with the trained policy); False for
one that brings a model of its own. Sampler modules import torch only when a sampler is built, so checking
a job file stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rto.registry import Registry


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    policies: Literal["text", "vision", "any"]
    stage: str | None
    build: Callable[[Any, str, Path | None], Any]
    check: Callable[[Any], tuple[str, str] | None] | None = None
    shares_weights: bool = True


_SAMPLERS: Registry[SamplerSpec] = Registry("rollout sampler")
_found = False


def register_sampler(
    name: str,
    *,
    policies: Literal["text", "vision", "any"],
    stage: str | None = None,
    check: Callable[[Any], tuple[str, str] | None] | None = None,
    shares_weights: bool = True,
) -> Callable:
    def decorator(build: Callable) -> Callable:
        _SAMPLERS.register(name)(SamplerSpec(name, policies, stage, build, check, shares_weights))
        return build

    return decorator


def samplers() -> Registry[SamplerSpec]:
    """The registry, with every `prune/*/rollout.py` module imported (once)."""
    global _found
    if not _found:
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if module.ispkg and importlib.util.find_spec(f"prune.{module.name}.rollout") is not None:
                importlib.import_module(f"prune.{module.name}.rollout")
        _found = True
    return _SAMPLERS


@register_sampler("none", policies="any")
def dense(job, policy: str, stage_dir: Path | None) -> None:
    """The dense policy samples its own rollouts (`rto.generation.hf_generate`)."""
    return None
