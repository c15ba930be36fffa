"""Pruned prefill and decode for Llava-family models (a Llama/Qwen2/Mistral-style language model).

The engine runs the language model's decoder layers itself (calling transformers' own layer
modules, so their fast attention kernels — SDPA, flash — are used everywhere) and, after each
layer named in the schedule, scores the vision tokens from that layer's attention and removes all
but the top-k from the sequence. Attention probabilities are computed explicitly only there, and
only for the query rows the scorer needs (the text after the image for AdaptInfer).

Bookkeeping, per sample b and sequence index j (all samples keep the same number of tokens):
position ids, a padding flag, and the original ordinal of each vision token (-1 for text). Layer l's KV cache holds the
tokens present at layer l: a pruned token writes no key/value in any later layer, and each layer
keeps its own key-padding mask for decoding.

Position ids of the kept tokens (`positions=`): ``"original"`` (default) keeps each token's dense
position id, so RoPE sees the dense model's relative distances (as FastV's official code does);
``"contiguous"`` renumbers the tokens present after every cut 0..n-1, as the official AdaptInfer
code does (it inherits SparseVLM's ``position_ids[:, :n_kept]``). With contiguous ids a text token
has a different position in the layers before and after a cut, and decoding continues each
layer's numbering from that layer's own cache length, as the official decode path does.

With an empty schedule this is exactly the dense model (the tests check it against HF `forward`
and `generate`), whatever `positions` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prune.adaptinfer.scoring import SCORERS, top_k_vision
from rto.errors import UserError


@dataclass
class PruneTrace:
    """What the pruner did: tokens present per layer and, per pruning layer, the kept vision ordinals."""

    tokens_per_layer: list[int] = field(default_factory=list)
    vision_per_layer: list[int] = field(default_factory=list)
    kept_vision: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, k) ordinals
    scoring: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (query rows, keys)
    text_to_vision: list[float] = field(default_factory=list)  # with probe=True: per layer, see `prefill`


@dataclass
class PrunedCache:
    """A transformers `DynamicCache` whose layers hold different tokens, with per-layer key masks."""

    cache: object
    key_valid: list[torch.Tensor]  # per layer (B, kv_len) bool
    next_position: torch.Tensor  # (B,) position id of the next token
    layer_next_position: list[torch.Tensor] | None = None  # contiguous ids: per layer (B,), else None


# ---------------------------------------------------------------- model access and validation


def parts(model):
    """(llava inner model, language model) of a Llava-family model; `UserError` if it is not one."""
    inner = getattr(model, "model", None)
    if inner is None or getattr(inner, "vision_tower", None) is None:
        raise UserError(
            f"{type(model).__name__} has no vision tower; vision-token pruning needs a Llava-family model"
        )
    language_model = getattr(inner, "language_model", None)
    if language_model is None or not hasattr(language_model, "layers"):
        raise UserError(f"{type(model).__name__} has no decoder-layer language model", field="language_model")
    return inner, language_model


def check_schedule(schedule: dict[int, int], n_layers: int, n_vision: int) -> list[tuple[int, int]]:
    """Sorted (layer, keep) pairs; `UserError` for a missing layer or more tokens kept than exist."""
    steps, present = sorted((int(k), int(v)) for k, v in schedule.items()), n_vision
    for layer, keep in steps:
        if not 0 <= layer < n_layers:
            raise UserError(
                f"layer {layer} does not exist (the model has layers 0..{n_layers - 1})", field="schedule"
            )
        if not 0 <= keep <= present:
            raise UserError(
                f"layer {layer} keeps {keep} vision tokens but only {present} exist there", field="schedule"
            )
        present = keep
    return steps


def image_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor):
    """inputs_embeds with the projected image features scattered in, and the (B, T) vision mask."""
    inner, _ = parts(model)
    image_token_id = model.config.image_token_id
    vision = input_ids == image_token_id
    counts = vision.sum(-1)
    if pixel_values is None or pixel_values.shape[0] != input_ids.shape[0]:
        raise UserError(
            "expected one image per sample (pixel_values rows == batch size)", field="pixel_values"
        )
    features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    features = torch.stack(list(features)) if isinstance(features, list | tuple) else features
    if not bool((counts == features.shape[1]).all()):
        raise UserError(
            f"each prompt needs {features.shape[1]} image tokens, got {sorted(set(counts.tolist()))}",
            field="input_ids",
        )
    embeds = inner.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter(vision[..., None], features.to(embeds.dtype))
    return embeds, vision


# ---------------------------------------------------------------- masks and attention rows


def attention_mask_for(config, key_valid: torch.Tensor, n_query: int, dtype: torch.dtype):
    """Mask for `n_query` new tokens (the last ones) over keys `key_valid` (B, K); None when dense causal."""
    b, k = key_valid.shape
    if bool(key_valid.all()) and (n_query == 1 or n_query == k):
        return None  # SDPA's is_causal (prefill) or no mask (one-token decode), as HF does
    query_pos = torch.arange(k - n_query, k, device=key_valid.device)
    allowed = key_valid[:, None, :] & (
        torch.arange(k, device=key_valid.device)[None, :] <= query_pos[:, None]
    )
    allowed = allowed | (
        torch.arange(k, device=key_valid.device)[None, :] == query_pos[:, None]
    )  # no empty rows
    allowed = allowed[:, None]  # (B, 1, Q, K)
    if getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "flash_attention_2", "flex_attention"):
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def select_rows(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flags (B, N) bool -> (index (B, Q), valid (B, Q)) of the True positions, padded to the max count."""
    counts = flags.sum(-1)
    order = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices
    width = max(int(counts.max()), 1)
    valid = torch.arange(width, device=flags.device)[None, :] < counts[:, None]
    return order[:, :width], valid


def attention_rows(layer, hidden_in, position_embeddings, keys, key_valid, rows, rows_valid) -> torch.Tensor:
    """Softmax attention (B, H, Q, N), in float32, of the query rows `rows` at this layer.

    Recomputes only the Q query projections; the keys (B, KVH, N, D) are the layer's cached,
    RoPE-applied keys. Causal and key-padding masks as in the real forward.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    b, q = rows.shape
    x = hidden_in.gather(1, rows[..., None].expand(b, q, hidden_in.shape[-1]))
    query = attn.q_proj(layer.input_layernorm(x)).view(b, q, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        query = attn.q_norm(query)
    cos, sin = (t.gather(1, rows[..., None].expand(b, q, t.shape[-1])) for t in position_embeddings)
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    keys = repeat_kv(keys, attn.num_key_value_groups)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * attn.scaling
    n = keys.shape[-2]
    allowed = key_valid[:, None, :] & (torch.arange(n, device=rows.device)[None, None, :] <= rows[..., None])
    allowed = allowed & rows_valid[..., None]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


# ---------------------------------------------------------------- prefill and decode


def prefill(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    schedule: dict[int, int] | None = None,
    method: str = "adaptinfer",
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    probe: bool = False,
    *,
    positions: str = "original",
) -> tuple[torch.Tensor, PrunedCache | None, PruneTrace]:
    """Pruned prefill. Returns the last position's logits (B, vocab), the cache and a `PruneTrace`.

    With `probe`, every layer also records in `trace.text_to_vision` the share of the text
    queries' attention that goes to vision tokens (mean over samples, heads and text rows), the
    profile that `prune.adaptinfer.analysis` reads cut layers from. The cache is always built (the
    scorers read the pruning layer's keys from it); `use_cache=False` only drops it at the end.
    `positions`: ``"original"`` or ``"contiguous"`` position ids for the kept tokens (module doc).
    """
    if positions not in ("original", "contiguous"):
        raise UserError(f"positions must be 'original' or 'contiguous', got {positions!r}", field="positions")
    contiguous = positions == "contiguous"  # `positions` is reused below for the id tensor
    inner, lm = parts(model)
    scorer = SCORERS.get(method)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    hidden, vision = image_embeddings(model, input_ids, pixel_values)
    n_vision = int(vision[0].sum())
    steps = dict(check_schedule(schedule or {}, len(lm.layers), n_vision))
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    last_vision = torch.where(vision, torch.arange(vision.shape[1], device=vision.device), -1).amax(
        -1, keepdim=True
    )
    text = valid & ~vision & (torch.arange(vision.shape[1], device=vision.device)[None, :] > last_vision)
    ordinal = torch.where(vision, vision.long().cumsum(-1) - 1, -1)

    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    trace, key_valid = PruneTrace(), []
    position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
    layer_next = []
    for index, layer in enumerate(lm.layers):
        layer_next.append(positions.amax(-1) + 1)
        trace.tokens_per_layer.append(hidden.shape[1])
        trace.vision_per_layer.append(int(vision[0].sum()))
        mask = attention_mask_for(lm.config, valid, hidden.shape[1], hidden.dtype)
        hidden_in = hidden
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        key_valid.append(valid)
        if probe:
            rows, rows_valid = select_rows(text)
            attn = attention_rows(
                layer, hidden_in, position_embeddings, cache.layers[index].keys, valid, rows, rows_valid
            )
            share = (attn * vision[:, None, None, :]).sum(-1).mean(1)  # (B, Q)
            trace.text_to_vision.append(float((share * rows_valid).sum() / rows_valid.sum()))
        if index not in steps:
            continue
        vision_index, _ = select_rows(vision)
        if scorer.queries == "none":
            attn, rows, rows_valid = None, None, None
        else:
            rows, rows_valid = select_rows(text if scorer.queries == "text" else valid)
            keys = cache.layers[index].keys
            attn = attention_rows(layer, hidden_in, position_embeddings, keys, valid, rows, rows_valid)
            trace.scoring[index] = (rows.shape[1], keys.shape[-2])
        scores = scorer.score(attn, rows, rows_valid, vision_index, generator=generator)
        kept = vision_index.gather(1, top_k_vision(scores, steps[index]))
        keep = (~vision).scatter(1, kept, True)
        b, n_keep = keep.shape[0], int(keep[0].sum())
        order = select_rows(keep)[0][:, :n_keep]
        trace.kept_vision[index] = ordinal.gather(1, kept)
        hidden = hidden.gather(1, order[..., None].expand(b, n_keep, hidden.shape[-1]))
        positions, valid, vision, text, ordinal = (
            t.gather(1, order) for t in (positions, valid, vision, text, ordinal)
        )
        if contiguous:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
        else:
            position_embeddings = tuple(
                t.gather(1, order[..., None].expand(b, n_keep, t.shape[-1])) for t in position_embeddings
            )
    logits = model.lm_head(lm.norm(hidden[:, -1:]))[:, 0]
    per_layer = layer_next if contiguous else None
    state = PrunedCache(cache, key_valid, positions.amax(-1) + 1, per_layer) if use_cache else None
    return logits, state, trace


def decode(model, token_ids: torch.Tensor, state: PrunedCache) -> torch.Tensor:
    """One decoding step for (B,) tokens; updates `state` in place and returns logits (B, vocab)."""
    _, lm = parts(model)
    hidden = lm.embed_tokens(token_ids[:, None])
    positions = state.next_position[:, None]
    position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
    ones = torch.ones_like(token_ids, dtype=torch.bool)[:, None]
    for index, layer in enumerate(lm.layers):
        if state.layer_next_position is not None:  # contiguous ids: this layer's own numbering
            positions = state.layer_next_position[index][:, None]
            position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
            state.layer_next_position[index] = state.layer_next_position[index] + 1
        state.key_valid[index] = torch.cat([state.key_valid[index], ones], dim=1)
        mask = attention_mask_for(lm.config, state.key_valid[index], 1, hidden.dtype)
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
        )
    state.next_position = state.next_position + 1
    return model.lm_head(lm.norm(hidden))[:, 0]
