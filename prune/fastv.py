"""FastV (Chen et al., ECCV 2024): at layer K, rank vision tokens by the attention they receive and
drop R% of them for all later layers.

It runs in the AdaptInfer engine (`prune.adaptinfer.engine`) as the scorer ``fastv`` with a
one-step schedule. The paper's "K = 2" means the first two layers see every token and the
attention of the layer before the cut (0-based layer K − 1 = 1) ranks them, so the engine
schedule is ``{K - 1: round(n_vision * (1 - R))}``. The score of a vision token is the attention it
receives, averaged over heads and over all (non-padding) query tokens, as the paper defines it.
"""

from __future__ import annotations

import torch

from prune.adaptinfer.scoring import register_scorer
from rto.errors import UserError


@register_scorer("fastv", queries="all")
def fastv_scores(attn, query_index, query_valid, vision_index, **_) -> torch.Tensor:
    """Mean over heads and valid query rows of A[i, v] (B, V)."""
    b, h, q, _ = attn.shape
    received = attn.float().gather(-1, vision_index[:, None, None, :].expand(b, h, q, vision_index.shape[-1]))
    received = received * query_valid[:, None, :, None]
    return received.sum(dim=(1, 2)) / (h * query_valid.sum(-1, keepdim=True).clamp(min=1))


def fastv_schedule(n_vision: int, k: int = 2, ratio: float = 0.5) -> dict[int, int]:
    """The engine schedule for FastV(K, R): after 0-based layer K-1 keep round(n_vision · (1 − R))."""
    if k < 1:
        raise UserError(f"FastV K must be >= 1, got {k}", field="fastv.k")
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"FastV drop ratio must be in [0, 1], got {ratio}", field="fastv.ratio")
    return {k - 1: round(n_vision * (1.0 - ratio))}


def fastv_schedule_for_budget(n_layers: int, n_vision: int, mean_keep: float, k: int = 2) -> dict[int, int]:
    """FastV(K) keeping, after layer K-1, the count that makes the per-layer mean `mean_keep`.

    K layers see all `n_vision` tokens, the other n_layers − K see n: n = (L·mean − K·N) / (L − K).
    """
    keep = round((n_layers * mean_keep - k * n_vision) / (n_layers - k))
    if keep < 0:
        raise UserError(
            f"FastV with K={k} cannot reach a mean of {mean_keep:g} vision tokens per layer", field="fastv.k"
        )
    return {k - 1: min(keep, n_vision)}
