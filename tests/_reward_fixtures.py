"""Tiny word-level tokenizer and Llama models for the reward/scoring tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = "the a cat dog sat ran on mat home fast slow big small red blue and".split()
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def tiny_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(vocab_size: int = 64, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_lm(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def tiny_rm(seed: int = 0, **overrides) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_config(num_labels=1, **overrides)).eval()


def perturbed(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """The same architecture with every weight moved by scale·N(0, 1)·std(weight)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * noise * parameter.std().clamp_min(1e-3))
    return model


def save(model_or_tokenizer, path: Path, tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    model_or_tokenizer.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
