"""Random Llama-family models built from configs (tests and the speed benchmark; no downloads)."""

from __future__ import annotations

import torch

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads)
    "tiny": (64, 128, 4, 4, 2),
    "cpu": (1024, 2816, 8, 16, 16),
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B shape
}


def random_causal_lm(
    model_type: str = "llama",
    size: str = "tiny",
    *,
    vocab_size: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A randomly initialised Llama / Qwen2 / Mistral causal LM of a named size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, intermediate, layers, heads, kv_heads = SIZES[size]
    fields = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
    )
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()
