"""Sparsity scheduler: a genetic search over per-block sparsities under a global budget.

A schedule is a list of per-block sparsities s_i in [0, max_block] whose mean is the budget (the
global token sparsity). Every candidate is projected back onto that set, so the budget holds by
construction. Fitness is lower-is-better (by default the KL of the pruned model to the dense one on
calibration data, with the static router before training and the learned one after).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prune.ftp.forward import skipping_forward
from prune.ftp.losses import distill_kl
from prune.ftp.router import Router


def project_to_budget(schedule: torch.Tensor, budget: float, max_block: float) -> torch.Tensor:
    """Closest-by-shift schedule with mean == budget and 0 <= s_i <= max_block (bisection on the shift)."""
    if not 0 <= budget <= max_block:
        raise ValueError(f"budget {budget} outside [0, max_block={max_block}]")
    schedule = schedule.double()
    low, high = -1.0 - float(schedule.max()), 1.0 - float(schedule.min()) + max_block
    for _ in range(60):
        mid = (low + high) / 2
        if float((schedule + mid).clamp(0, max_block).mean()) < budget:
            low = mid
        else:
            high = mid
    return (schedule + (low + high) / 2).clamp(0, max_block)


def uniform_schedule(n_layers: int, budget: float) -> list[float]:
    return [float(budget)] * n_layers


def genetic_search(
    fitness: Callable[[list[float]], float],
    n_layers: int,
    budget: float,
    *,
    max_block: float = 0.8,
    population: int = 16,
    generations: int = 12,
    elite: int = 2,
    mutation_std: float = 0.1,
    seed: int = 0,
    init: Sequence[list[float]] = (),
) -> tuple[list[float], list[dict]]:
    """Minimise `fitness(schedule)`; returns the best schedule and per-generation history."""
    gen = torch.Generator().manual_seed(seed)
    project = lambda s: project_to_budget(s, budget, max_block)  # noqa: E731
    pop = [project(torch.tensor(s, dtype=torch.float64)) for s in init] or [
        project(torch.full((n_layers,), budget))
    ]
    while len(pop) < population:
        noise = torch.randn(n_layers, generator=gen, dtype=torch.float64) * mutation_std * 2
        pop.append(project(pop[0] + noise))
    seen: dict[tuple, float] = {}

    def score(s: torch.Tensor) -> float:
        key = tuple(round(float(x), 4) for x in s)
        if key not in seen:
            seen[key] = float(fitness([float(x) for x in s]))
        return seen[key]

    history = []
    for generation in range(generations):
        scores = torch.tensor([score(s) for s in pop])
        ranked = [pop[i] for i in scores.argsort().tolist()]
        history.append({"generation": generation, "best": float(scores.min()), "mean": float(scores.mean())})
        if generation == generations - 1:
            break
        children = ranked[:elite]
        while len(children) < population:
            parents = []
            for _ in range(2):  # tournament of 3
                picks = torch.randint(len(pop), (3,), generator=gen)
                parents.append(pop[min(picks.tolist(), key=lambda i: scores[i])])
            take = torch.rand(n_layers, generator=gen) < 0.5
            child = torch.where(take, parents[0], parents[1])
            child = child + torch.randn(n_layers, generator=gen, dtype=torch.float64) * mutation_std
            children.append(project(child))
        pop = children
    best = ranked[0]
    return [float(x) for x in best], history


@torch.no_grad()
def schedule_kl(
    model, router: Router | str, schedule: list[float], batches, teacher_logits, n_probes: int = 8
) -> float:
    """Mean KL(dense || pruned) over calibration `batches` [(input_ids, attention_mask)]."""
    total = 0.0
    for (input_ids, attention_mask), teacher in zip(batches, teacher_logits, strict=True):
        out = skipping_forward(
            model, input_ids, attention_mask, schedule=schedule, router=router, n_probes=n_probes
        )
        total += float(distill_kl(teacher, out.logits, attention_mask.bool()))
    return total / max(len(batches), 1)


@torch.no_grad()
def dense_logits(model, batches) -> list[torch.Tensor]:
    return [model(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]


def search_schedule(
    model,
    router: Router | str,
    batches,
    budget: float,
    search,
    *,
    max_block: float,
    seed: int = 0,
    init: Sequence[list[float]] = (),
    n_probes: int = 8,
    teacher=None,
) -> tuple[list[float], list[dict]]:
    """Genetic search scored by KL to the dense model; `search` is an `FTPSearchConfig`."""
    teacher = teacher if teacher is not None else dense_logits(model, batches)
    n_layers = len(model.model.layers)
    return genetic_search(
        lambda s: schedule_kl(model, router, s, batches, teacher, n_probes),
        n_layers,
        budget,
        max_block=max_block,
        population=search.population,
        generations=search.generations,
        elite=search.elite,
        mutation_std=search.mutation_std,
        seed=seed,
        init=[uniform_schedule(n_layers, budget), *init],
    )
