"""Vision-token scores: small pure functions on attention tensors, behind a registry.

Every scorer sees the attention probabilities of some query rows at a pruning layer and returns one
score per vision token still present; the pruner keeps the top-k. Shapes:

* ``attn``          (B, H, Q, N)  softmax attention of Q query rows over the N tokens present
* ``query_index``   (B, Q)        sequence index (0..N-1) of each query row
* ``query_valid``   (B, Q)        False for padding rows (samples with fewer query tokens)
* ``vision_index``  (B, V)        sequence index of each vision token present
* returns           (B, V)        float32 scores

`Scorer.queries` says which rows the scorer needs, so that the engine computes only those:
``"text"`` (the instruction tokens after the image), ``"all"`` (every non-padding token) or
``"none"`` (no attention at all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from rto.registry import Registry

Queries = Literal["text", "all", "none"]


@dataclass(frozen=True)
class Scorer:
    name: str
    queries: Queries
    score: Callable[..., torch.Tensor]


SCORERS: Registry[Scorer] = Registry("vision-token scorer")


def register_scorer(name: str, queries: Queries) -> Callable:
    def decorator(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        SCORERS.register(name)(Scorer(name, queries, function))
        return function

    return decorator


def gather_columns(attn: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """attn (B, H, Q, N), index (B, K) -> (B, H, Q, K): the attention paid to the listed tokens."""
    b, h, q, _ = attn.shape
    return attn.gather(-1, index[:, None, None, :].expand(b, h, q, index.shape[-1]))


def text_prior_weights(a_tt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """AdaptInfer's text prior: S = A_tt + A_ttᵀ − diag(A_tt); w_j = Σ_i S_ij (per head, unnormalised).

    a_tt (B, H, T, T) text-to-text attention, valid (B, T) -> w (B, H, T), zero on padding rows.
    """
    pair = (valid[:, None, :, None] & valid[:, None, None, :]).to(a_tt.dtype)
    a = a_tt * pair
    s = a + a.transpose(-1, -2) - torch.diag_embed(a.diagonal(dim1=-2, dim2=-1))
    return s.sum(dim=-2)


@register_scorer("adaptinfer", queries="text")
def adaptinfer_scores(
    attn, query_index, query_valid, vision_index, text_prior: bool = True, **_
) -> torch.Tensor:
    """s_v = Σ_heads Σ_text w_i · A[i, v], with w the text prior (or 1 when `text_prior` is False)."""
    attn = attn.float()
    if text_prior:
        weights = text_prior_weights(gather_columns(attn, query_index), query_valid)
    else:
        weights = query_valid[:, None, :].float().expand(-1, attn.shape[1], -1)
    weights = weights * query_valid[:, None, :]
    return torch.einsum("bhq,bhqv->bv", weights, gather_columns(attn, vision_index))


@register_scorer("adaptinfer_no_prior", queries="text")
def adaptinfer_no_prior_scores(attn, query_index, query_valid, vision_index, **_) -> torch.Tensor:
    """Ablation: every text token weighs 1 (no text-to-text prior)."""
    return adaptinfer_scores(attn, query_index, query_valid, vision_index, text_prior=False)


@register_scorer("random", queries="none")
def random_scores(attn, query_index, query_valid, vision_index, generator=None, **_) -> torch.Tensor:
    """Baseline: uniform random scores (seeded through `generator`)."""
    return torch.rand(vision_index.shape, generator=generator).to(vision_index.device)


def top_k_vision(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) scores -> (B, k) column indices of the k best, in ascending (sequence) order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values
