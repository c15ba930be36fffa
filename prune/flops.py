"""FLOPs accounting shared by the pruners (FTP, ShortGPT, AdaptInfer, FastV).

Counts multiply-adds as 2 FLOPs, for the tokens a decoder layer actually computes. A layer that
processes `n_query` tokens which attend to `n_pairs` (query, key) pairs in total costs

* attention projections: q and o over `n_query` tokens, k and v over the tokens that write keys at
  this layer (the same `n_query` tokens: a skipped or pruned token writes no key/value),
* attention scores and the weighted sum: 2 * n_pairs * head_dim per head, twice (QK^T and AV),
* the gated MLP (Llama/Qwen2/Mistral): three matrices of hidden x intermediate.

Embeddings, the final norm and the LM head are outside the decoder layers and are counted
separately by `lm_head_flops`, since pruning does not change them for the positions that are kept.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> LayerShape:
        text = getattr(config, "text_config", None) or config
        n_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        return cls(
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            n_heads=n_heads,
            n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
        )


@dataclass(frozen=True)
class LayerFlops:
    attn_proj: float
    attn_scores: float
    mlp: float

    @property
    def total(self) -> float:
        return self.attn_proj + self.attn_scores + self.mlp


def causal_pairs(n_tokens: int, n_past: int = 0) -> int:
    """(query, key) pairs when `n_tokens` new tokens attend causally to `n_past` cached ones."""
    return n_tokens * n_past + n_tokens * (n_tokens + 1) // 2


def decoder_layer_flops(shape: LayerShape, n_query: int, n_pairs: int) -> LayerFlops:
    q_dim = shape.n_heads * shape.head_dim
    kv_dim = shape.n_kv_heads * shape.head_dim
    proj = 2 * n_query * shape.hidden * (2 * q_dim + 2 * kv_dim)
    scores = 2 * 2 * n_pairs * shape.head_dim * shape.n_heads
    mlp = 2 * n_query * 3 * shape.hidden * shape.intermediate
    return LayerFlops(attn_proj=float(proj), attn_scores=float(scores), mlp=float(mlp))


def dense_prefill_flops(config, n_tokens: int, n_layers: int | None = None) -> float:
    """Decoder-layer FLOPs of a dense causal prefill of `n_tokens` tokens."""
    shape = LayerShape.from_config(config)
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers if n_layers is None else n_layers
    return layers * decoder_layer_flops(shape, n_tokens, causal_pairs(n_tokens)).total


def lm_head_flops(config, n_positions: int) -> float:
    text = getattr(config, "text_config", None) or config
    return float(2 * n_positions * text.hidden_size * text.vocab_size)


def prefill_flops_per_layer(config, tokens_per_layer: list[int]) -> list[float]:
    """Decoder-layer FLOPs of a causal prefill in which layer l computes `tokens_per_layer[l]` tokens.

    For token pruning (AdaptInfer, FastV): the tokens present at a layer attend causally to each
    other and write keys/values only there.
    """
    shape = LayerShape.from_config(config)
    return [decoder_layer_flops(shape, n, causal_pairs(n)).total for n in tokens_per_layer]


def attention_rows_flops(config, n_query: int, n_keys: int) -> float:
    """Extra FLOPs of computing `n_query` rows of attention probabilities explicitly (q projection of
    those rows and their QK^T over `n_keys` keys), as vision-token scorers do at pruning layers."""
    shape = LayerShape.from_config(config)
    q_proj = 2 * n_query * shape.hidden * shape.n_heads * shape.head_dim
    scores = 2 * n_query * n_keys * shape.head_dim * shape.n_heads
    return float(q_proj + scores)


def kept_tokens(n_tokens: int, sparsity: float) -> int:
    """Tokens a block computes at token sparsity `sparsity` (the FTP top-k rule; 1.0 removes the block)."""
    if sparsity >= 1:
        return 0
    return max(1, round((1.0 - sparsity) * n_tokens)) if n_tokens else 0


def token_sparsity_prefill_flops(config, n_tokens: int, schedule: list[float]) -> float:
    """Decoder-layer FLOPs of a prefill in which block l computes `kept_tokens(n_tokens, schedule[l])`
    tokens (FTP token skipping; ShortGPT is the schedule with 1.0 at removed blocks). The kept
    tokens attend causally to each other only: k tokens make k(k+1)/2 (query, key) pairs."""
    shape = LayerShape.from_config(config)
    total = 0.0
    for sparsity in schedule:
        k = kept_tokens(n_tokens, sparsity)
        total += decoder_layer_flops(shape, k, causal_pairs(k)).total
    return total


def token_sparsity_rollout_flops(
    config, prompt_tokens: int, new_tokens: int, schedule: list[float], decode_keep: list[float] | None = None
) -> tuple[float, float]:
    """(prefill, decode) decoder-layer FLOPs of one rollout: a prefill of `prompt_tokens` routed by
    `schedule`, then `new_tokens` decoded one at a time. A decoded token computes block l with
    probability `decode_keep[l]` (default 1: dense decoding, FTP's default) and attends to the
    keys block l holds: the prompt's kept tokens and the decoded tokens it computed. The dense
    rollout is the schedule of zeros; a removed block (1.0) costs nothing in either phase."""
    shape = LayerShape.from_config(config)
    keep = decode_keep if decode_keep is not None else [1.0] * len(schedule)
    prefill = decode = 0.0
    for sparsity, p in zip(schedule, keep, strict=True):
        k = kept_tokens(prompt_tokens, sparsity)
        prefill += decoder_layer_flops(shape, k, causal_pairs(k)).total
        if sparsity >= 1:
            continue
        for t in range(new_tokens):
            decode += p * decoder_layer_flops(shape, 1, round(k + p * t) + 1).total
    return prefill, decode
