"""ShortGPT baseline (Men et al., 2024): remove whole decoder layers ranked by Block Influence,

    BI_l = 1 - mean over tokens of cos(input of block l, output of block l),

lowest first. `flops_matched_layers` picks how many to remove so that the prefill FLOPs match a
token-sparsity schedule's (prune/flops.py), for a FLOPs-matched comparison with FTP.
"""

from __future__ import annotations

import copy

import torch

from prune.flops import token_sparsity_prefill_flops


@torch.no_grad()
def block_influence(model, batches) -> list[float]:
    """BI of every decoder layer on calibration `batches` [(input_ids, attention_mask)]."""
    layers = model.model.layers
    sums, counts = [0.0] * len(layers), [0] * len(layers)
    current_mask: list[torch.Tensor] = []

    def hook(idx):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            valid = current_mask[0]
            sums[idx] += float((1 - cos)[valid].sum())
            counts[idx] += int(valid.sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for input_ids, attention_mask in batches:
            current_mask[:] = [attention_mask.bool()]
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def layers_to_remove(influence: list[float], n_remove: int) -> list[int]:
    """The `n_remove` layers of lowest block influence, in layer order."""
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    return sorted(order[:n_remove])


def removal_schedule(n_layers: int, removed: list[int]) -> list[float]:
    """ShortGPT as a per-block sparsity schedule (1.0 = block removed) for `skipping_forward`."""
    return [1.0 if i in removed else 0.0 for i in range(n_layers)]


def flops_matched_layers(config, n_tokens: int, schedule: list[float]) -> int:
    """Number of layers to remove whose prefill FLOPs are closest to those of `schedule`."""
    n_layers = len(schedule)
    target = token_sparsity_prefill_flops(config, n_tokens, schedule)
    costs = [
        token_sparsity_prefill_flops(config, n_tokens, [1.0] * n + [0.0] * (n_layers - n))
        for n in range(n_layers)
    ]
    return min(range(n_layers), key=lambda n: abs(costs[n] - target))


def remove_layers(model, removed: list[int]):
    """A copy of `model` without the `removed` decoder layers (a normal HF model: save/generate)."""
    pruned = copy.deepcopy(model)
    keep = [layer for i, layer in enumerate(pruned.model.layers) if i not in set(removed)]
    pruned.model.layers = torch.nn.ModuleList(keep)
    for new_idx, layer in enumerate(keep):
        layer.self_attn.layer_idx = new_idx
    config = pruned.config
    if getattr(config, "layer_types", None):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in set(removed)]
    config.num_hidden_layers = len(keep)
    return pruned
