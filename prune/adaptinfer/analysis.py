"""Offline analysis of cross-modal attention shifts: where to cut (AdaptInfer §3, our reading).

The paper chooses its pruning layers offline, from how much attention the text tokens pay to the
image at each layer: the share drops sharply at a few consistent depths ("inflection locations";
layers 1, 10, 20 for LLaVA-1.5-7B), and pruning right before a drop costs little, since later
layers look at the image less. Here: run the dense model with `probe=True` on a few batches,
average the per-layer share, and cut after the layers followed by the largest drops.
"""

from __future__ import annotations

import torch

from prune.adaptinfer.engine import prefill


@torch.no_grad()
def text_to_vision_profile(model, batches: list[dict]) -> list[float]:
    """Mean share of text-query attention on vision tokens per decoder layer, dense model."""
    profiles = []
    for inputs in batches:
        _, _, trace = prefill(
            model,
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs.get("attention_mask"),
            {},
            probe=True,
            use_cache=False,
        )
        profiles.append(torch.tensor(trace.text_to_vision))
    return torch.stack(profiles).mean(0).tolist()


def inflection_layers(profile: list[float], n_cuts: int = 3) -> list[int]:
    """The `n_cuts` layers l with the largest drop profile[l] − profile[l+1], ascending."""
    drops = torch.tensor(profile[:-1]) - torch.tensor(profile[1:])
    return sorted(drops.topk(min(n_cuts, len(drops))).indices.tolist())
