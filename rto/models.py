"""Loading models and tokenizers from Hub names or local folders, with errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path

from rto.errors import UserError


def check_model_path(path_or_name: str | os.PathLike, field: str | None = None) -> str:
    """A local path must exist; a bare `org/name` is left to the Hub unless `org` is a local folder."""
    text = str(path_or_name)
    path = Path(text).expanduser()
    slashes = text.count("/")
    looks_local = (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or slashes > 1
        or (slashes == 1 and path.parent.is_dir())
    )
    if looks_local and not path.exists():
        raise UserError(f"model folder '{text}' does not exist", source=None if field else text, field=field)
    return text


def load_tokenizer(path: str, field: str = "policy.path"):
    from transformers import AutoTokenizer

    check_model_path(path, field)
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

    check_model_path(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load a causal LM from '{path}': {str(exc).splitlines()[0]}", field=field
        ) from None
    return model.to(device)
