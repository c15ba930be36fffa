"""Loading models and tokenizers from Hub names or local folders, with errors that name the field."""

from __future__ import annotations

from pathlib import Path

from rto.errors import UserError


def _check(path: str, field: str) -> None:
    local = Path(path)
    if (
        (path.startswith(("/", ".", "~")) or local.parent != Path("."))
        and not local.exists()
        and path.count("/") != 1
    ):
        raise UserError(f"model folder '{path}' does not exist", field=field)


def load_tokenizer(path: str, field: str = "policy.path"):
    from transformers import AutoTokenizer

    _check(path, field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load a tokenizer from '{path}': {str(exc).splitlines()[0]}", field=field
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, field: str = "policy.path", dtype=None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    _check(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load a causal LM from '{path}': {str(exc).splitlines()[0]}", field=field
        ) from None
    return model.to(device)
