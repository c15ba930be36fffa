"""The four low-dimensional factors the FTP router sees for each token at each block.

1. relative position: `position / last position` of the row (0 = first token, 1 = newest),
2. attention received: the latest attention score the token received (a running table, because a
   token skipped at a block gets no fresh score there), as `log1p(score * n_keys)` so that a token
   getting its uniform share scores log(2),
3. rank of the token by that score in its row, normalised to [0, 1] (0 = most attended),
4. the block's target sparsity.
"""

from __future__ import annotations

import torch

N_FACTORS = 4


def relative_positions(positions: torch.Tensor, last_position: torch.Tensor) -> torch.Tensor:
    """positions [B, T], last_position [B] -> [B, T] in [0, 1]."""
    return positions.float() / last_position.clamp(min=1).float()[:, None]


def attention_ranks(table: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Rank of every column of the attention table among the row's seen columns, in [0, 1].

    table, seen: [B, S]. Unseen columns get rank 1. Ties keep column order (stable sort)."""
    score = table.masked_fill(~seen, float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(table.shape[1], device=table.device).expand_as(order))
    n_seen = seen.sum(1, keepdim=True).clamp(min=2)
    return (ranks.float() / (n_seen - 1)).clamp(max=1.0)


def router_factors(
    rel_pos: torch.Tensor, attn_score: torch.Tensor, attn_rank: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Stack the factors of the tokens being routed: each input [B, T] -> [B, T, 4]."""
    target = torch.full_like(rel_pos, float(sparsity))
    return torch.stack([rel_pos, torch.log1p(attn_score.clamp(min=0)), attn_rank, target], dim=-1)
