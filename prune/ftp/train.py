"""Router training with the LLM frozen: guide (decaying) + one-sided sparsity + distillation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prune.ftp.forward import skipping_forward
from prune.ftp.losses import distill_kl, guide_loss, guide_weight, sparsity_loss
from prune.ftp.router import Router, select_topk, static_logits


def router_loss(
    model,
    router: Router,
    schedule: list[float],
    input_ids,
    attention_mask,
    teacher_logits,
    *,
    guide_w: float,
    sparsity_w: float,
    distill_w: float,
    tau: float = 1.0,
    n_probes: int = 8,
) -> tuple[torch.Tensor, dict]:
    """One relaxed forward of the pruned model -> (weighted loss, its parts as floats)."""
    out = skipping_forward(
        model,
        input_ids,
        attention_mask,
        schedule=schedule,
        router=router,
        train=True,
        tau=tau,
        n_probes=n_probes,
    )
    routed = [r for r in out.routes if r.keep_prob is not None]
    probs, valids = [r.keep_prob for r in routed], [r.valid for r in routed]
    guides = [select_topk(static_logits(r.state), r.valid, r.state.is_first, r.sparsity) for r in routed]
    parts = {
        "guide": guide_loss(probs, guides, valids),
        "sparsity": sparsity_loss(probs, valids, [r.sparsity for r in routed]),
        "distill": distill_kl(teacher_logits, out.logits, attention_mask.bool()),
    }
    loss = guide_w * parts["guide"] + sparsity_w * parts["sparsity"] + distill_w * parts["distill"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def train_router(
    model,
    router: Router,
    schedule: list[float],
    batches,
    settings,
    *,
    n_probes: int = 8,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `router` in place on `batches` [(input_ids, attention_mask)] for `settings.steps` steps
    (`settings` is an `FTPTrainConfig`). The model's weights are never updated."""
    if not any(0 < s < 1 for s in schedule):
        return []
    model.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        teachers = [model(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]
    optimizer = torch.optim.AdamW(router.parameters(), lr=settings.lr)
    history = []
    for step in range(settings.steps):
        (input_ids, attention_mask), teacher = batches[step % len(batches)], teachers[step % len(batches)]
        loss, parts = router_loss(
            model,
            router,
            schedule,
            input_ids,
            attention_mask,
            teacher,
            guide_w=guide_weight(step, settings.guide_weight, settings.guide_decay),
            sparsity_w=settings.sparsity_weight,
            distill_w=settings.distill_weight,
            tau=settings.gumbel_tau,
            n_probes=n_probes,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": float(loss.detach()), **parts}
        history.append(record)
        if log is not None:
            log(record)
    return history
