"""The three FTP router losses, as pure functions on tensors.

All take the per-block routing records of one forward (`LayerRoute`s: keep_prob, valid [B, T]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def guide_loss(
    keep_probs: list[torch.Tensor], guide_keeps: list[torch.Tensor], valids: list[torch.Tensor]
) -> torch.Tensor:
    """Binary cross-entropy of the router's keep-probabilities against the static router's choices,
    averaged over the routed blocks' valid tokens."""
    losses = [
        F.binary_cross_entropy(p[v].clamp(1e-6, 1 - 1e-6), g[v].float())
        for p, g, v in zip(keep_probs, guide_keeps, valids, strict=True)
    ]
    return torch.stack(losses).mean()


def sparsity_loss(
    keep_probs: list[torch.Tensor], valids: list[torch.Tensor], targets: list[float]
) -> torch.Tensor:
    """One-sided: sum over blocks of max(s_target - s_actual, 0), s_actual = 1 - mean keep-prob."""
    terms = [
        torch.relu(torch.as_tensor(target) - (1.0 - p[v].mean()))
        for p, v, target in zip(keep_probs, valids, targets, strict=True)
    ]
    return torch.stack(terms).sum()


def distill_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over valid positions of KL(teacher || student) of the next-token distributions."""
    teacher = teacher_logits[valid].float().log_softmax(-1)
    student = student_logits[valid].float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def guide_weight(step: int, initial: float, decay: float) -> float:
    """The guide loss weight decays geometrically: initial * decay**step."""
    return initial * decay**step
