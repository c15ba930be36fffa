"""Token-skipping forward for Hugging Face Llama-family decoders (Llama, Qwen2, Mistral).

Our own loop over `model.model.layers`: at each block the router picks tokens; only those are
gathered (kept in position order), run through the unmodified HF decoder layer with their own
rotary embeddings and an explicit position-based mask, and scattered back. Skipped tokens pass
through unchanged and write no key/value at that block, so every layer's KV cache (`SkipCache`)
holds only the tokens computed there. With every token kept this is exactly the dense model.

Training (`train=True`): every valid token is computed, but only the router's hard choices write
keys; outputs are mixed as `h + gate * (block(h) - h)` with a straight-through gate
(`hard + p - p.detach()`, p from Gumbel-noised logits), so values equal the hard forward's while
gradients reach the router.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch

from prune.ftp.factors import attention_ranks, relative_positions
from prune.ftp.router import Router, RouteState, check_supported, make_scorer, select_threshold, select_topk


@dataclass
class SkipCache:
    """KV cache in which each layer holds only the tokens computed at that layer.

    HF attention calls `update(k, v, layer_idx)`; the forward loop keeps, next to each layer's
    keys, their positions, validity and sequence columns. `attn_table` is the running table of the
    latest attention each sequence column received ([B, columns])."""

    n_layers: int
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    key_pos: list = field(default_factory=list)
    key_valid: list = field(default_factory=list)
    key_col: list = field(default_factory=list)
    attn_table: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    n_columns: int = 0

    def __post_init__(self):
        for name in ("keys", "values", "key_pos", "key_valid", "key_col"):
            setattr(self, name, [None] * self.n_layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def kv_tokens(self) -> list[int]:
        """Valid cached tokens per layer, summed over the batch."""
        return [0 if v is None else int(v.sum()) for v in self.key_valid]


@dataclass
class LayerRoute:
    """Routing record of one block (all [B, T]); `keep_prob` is None for unrouted blocks."""

    sparsity: float
    keep: torch.Tensor
    valid: torch.Tensor
    keep_prob: torch.Tensor | None
    state: RouteState | None


@dataclass
class SkipOutput:
    logits: torch.Tensor
    cache: SkipCache
    routes: list[LayerRoute]


def attention_bias(q_pos, q_valid, k_pos, k_valid, window: int | None, dtype) -> torch.Tensor:
    """Additive mask [B, 1, Q, K]: a query sees valid keys at positions <= its own (within window)."""
    allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= k_pos[:, None, :] > q_pos[:, :, None] - window
    allowed &= q_valid[:, :, None]
    allowed |= ~allowed.any(-1, keepdim=True)  # unused slots: any finite row, the output is discarded
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _sliding_window(model, layer) -> int | None:
    window = getattr(layer.self_attn, "sliding_window", None)
    if window is None and model.config.model_type == "mistral":
        window = getattr(model.config, "sliding_window", None)
    return window


@functools.cache
def _cache_kwarg(layer_type: type) -> str:
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def probe_attention(model, layer, cache: SkipCache, idx: int, h_sel, pos_sel, kept, n_probes: int, window):
    """Attention each cached key of layer `idx` receives from the last `n_probes` kept tokens of its
    row (mean over heads and probes), times the number of valid keys: [B, K_cache].

    `kept` [B, slots] marks the slots the router kept. The deployed forward computes only those; the
    training forward computes every token, and probing its last slots instead would route training
    on factors inference never sees."""
    attn = layer.self_attn
    n_slots = h_sel.shape[1]
    n = min(n_probes, n_slots)
    order = torch.arange(n_slots, device=h_sel.device).expand_as(kept)
    slot = torch.where(kept, order, -1).topk(n, dim=1).values  # the last n kept slots (or -1)
    probe_valid = slot >= 0
    slot = slot.clamp(min=0)
    hp = h_sel.gather(1, slot[..., None].expand(-1, -1, h_sel.shape[-1]))
    pp = pos_sel.gather(1, slot)
    q = attn.q_proj(layer.input_layernorm(hp)).view(hp.shape[0], n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hp, pp)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    keys = cache.keys[idx].repeat_interleave(q.shape[1] // cache.keys[idx].shape[1], dim=1)
    scores = (q @ keys.transpose(2, 3)) * attn.scaling
    scores = scores + attention_bias(
        pp, probe_valid, cache.key_pos[idx], cache.key_valid[idx], window, scores.dtype
    )
    probs = scores.float().softmax(-1).mean(1)  # [B, P, K]
    weight = probe_valid.float()[..., None]
    received = (probs * weight).sum(1) / weight.sum(1).clamp(min=1)
    return received * cache.key_valid[idx].sum(1, keepdim=True), probe_valid.any(1)


def _update_table(cache: SkipCache, idx: int, received: torch.Tensor, probed: torch.Tensor) -> None:
    """Overwrite the table's entries of the keys the probes saw (rows that kept no token keep theirs)."""
    cols, valid = cache.key_col[idx], cache.key_valid[idx] & probed[:, None]
    hit = torch.zeros_like(cache.attn_table).scatter_add(1, cols, valid.float()) > 0
    vals = torch.zeros_like(cache.attn_table).scatter_add(1, cols, torch.where(valid, received, 0.0))
    cache.attn_table = torch.where(hit, vals, cache.attn_table)


def run_block(model, idx: int, h, positions, compute, write, gate, cache: SkipCache, past: int, probes: int):
    """Run decoder layer `idx` on the `compute` tokens of h [B, T, H]; `write` ⊆ compute store keys."""
    layer = model.model.layers[idx]
    counts = compute.sum(1)
    n_slots = int(counts.max())
    order = (~compute).to(torch.int8).argsort(dim=1, stable=True)[:, :n_slots]  # computed first, in order
    slot_valid = torch.arange(n_slots, device=h.device)[None] < counts[:, None]
    slot_write = write.gather(1, order) & slot_valid
    gather_h = order[..., None].expand(-1, -1, h.shape[-1])
    h_sel, pos_sel = h.gather(1, gather_h), positions.gather(1, order)

    first_use = cache.key_pos[idx] is None
    cat = (lambda old, new: new) if first_use else (lambda old, new: torch.cat([old, new], dim=1))
    cache.key_pos[idx] = cat(cache.key_pos[idx], pos_sel)
    cache.key_valid[idx] = cat(cache.key_valid[idx], slot_write)
    cache.key_col[idx] = cat(cache.key_col[idx], order + past)

    window = _sliding_window(model, layer)
    causal_ok = model.config._attn_implementation == "sdpa" and (window is None or window >= n_slots)
    if first_use and causal_ok and bool(slot_write.all()):
        mask = None  # slots are in position order: plain causal attention over the slots
    else:
        mask = attention_bias(pos_sel, slot_valid, cache.key_pos[idx], cache.key_valid[idx], window, h.dtype)
    out = layer(
        h_sel,
        attention_mask=mask,
        position_ids=pos_sel,
        position_embeddings=model.model.rotary_emb(h_sel, pos_sel),
        use_cache=True,
        **{_cache_kwarg(type(layer)): cache},
    )
    out = out[0] if isinstance(out, tuple) else out
    new_sel = torch.where(slot_valid[..., None], out, h_sel)
    if gate is not None:
        new_sel = h_sel + gate.gather(1, order)[..., None].to(h.dtype) * (new_sel - h_sel)
    if probes:
        received, probed = probe_attention(
            model, layer, cache, idx, h_sel, pos_sel, slot_write, probes, window
        )
        _update_table(cache, idx, received, probed)
    return h.scatter(1, gather_h, new_sel)


def skipping_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    schedule: list[float],
    router: Router | str = "static",
    cache: SkipCache | None = None,
    threshold: float | list[float] = 0.5,
    train: bool = False,
    tau: float = 1.0,
    n_probes: int = 8,
    logits_to_keep: int = 0,
    generator: torch.Generator | None = None,
    route_dense_decode: bool = False,
) -> SkipOutput:
    """Forward `input_ids` [B, T] (after `cache`, if given) with per-block token sparsity `schedule`.

    `attention_mask` [B, past + T] is the usual HF padding mask (left padding for generation).
    A block with sparsity 0 computes every token, 1 computes none (the block is removed). Several
    new tokens are routed top-k (prefill); a single new token after a cache by `threshold` (decode;
    one value, or one per block). A decode step whose thresholds are all 0 computes every block for
    the new token; it then neither scores nor probes (nothing reads the attention table again),
    unless `route_dense_decode` (to collect keep-probabilities, as threshold calibration does).
    """
    check_supported(model)
    layers = model.model.layers
    if len(schedule) != len(layers):
        raise ValueError(f"schedule has {len(schedule)} entries for {len(layers)} layers")
    batch, n_new = input_ids.shape
    cache = cache or SkipCache(len(layers))
    past = cache.n_columns
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + n_new, dtype=torch.long, device=input_ids.device)
    all_pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    positions, valid = all_pos[:, past:], attention_mask[:, past:].bool()
    rel_pos = relative_positions(positions, all_pos.max(1).values)
    is_first = (positions == 0) & valid
    new_table = torch.zeros(batch, n_new, device=input_ids.device)
    cache.attn_table = new_table if cache.attn_table is None else torch.cat([cache.attn_table, new_table], 1)
    cache.seen = valid if cache.seen is None else torch.cat([cache.seen, valid], 1)
    scorer, needs_attention = make_scorer(router, generator)
    decode = past > 0 and n_new == 1
    cuts = threshold if isinstance(threshold, (list, tuple)) else [threshold] * len(layers)
    dense_decode = decode and not route_dense_decode and all(c <= 0 for c in cuts)

    h = model.model.embed_tokens(input_ids)
    routes = []
    for idx, sparsity in enumerate(schedule):
        keep, prob, state = valid, None, None
        if sparsity >= 1:
            keep = torch.zeros_like(valid)
        elif sparsity > 0 and not dense_decode:
            rank = attention_ranks(cache.attn_table, cache.seen)[:, past:] if needs_attention else None
            state = RouteState(
                idx, float(sparsity), rel_pos, cache.attn_table[:, past:], rank, valid, is_first
            )
            logits = scorer(state)
            if train:
                u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
                logits = logits + torch.log(u) - torch.log1p(-u)
                prob = torch.sigmoid(logits / tau)
            else:
                prob = torch.sigmoid(logits)
            rule = select_threshold(logits, valid, cuts[idx]) if decode else None
            keep = rule if rule is not None else select_topk(logits, valid, is_first, float(sparsity))
        routes.append(LayerRoute(float(sparsity), keep, valid, prob, state))
        compute = valid if (train and prob is not None) else keep
        if not bool(compute.any()):
            continue
        gate = keep.float() + prob - prob.detach() if (train and prob is not None) else None
        probes = n_probes if needs_attention and not dense_decode else 0
        h = run_block(model, idx, h, positions, compute, keep, gate, cache, past, probes)

    cache.n_columns += n_new
    h = model.model.norm(h)
    if logits_to_keep:
        h = h[:, -logits_to_keep:]
    return SkipOutput(model.lm_head(h), cache, routes)


def achieved_sparsity(routes: list[LayerRoute]) -> list[float]:
    """Fraction of valid tokens each block skipped."""
    return [1.0 - float(r.keep.sum()) / max(int(r.valid.sum()), 1) for r in routes]
