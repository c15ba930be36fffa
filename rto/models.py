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


def guarded_from_pretrained(
    loader, path: str, what: str, field: str | None, *, errors=(OSError, ValueError), **kwargs
):
    """`loader.from_pretrained(path, **kwargs)` after the path check; a failure is a `UserError`
    saying what could not be loaded from where, naming the field when there is one."""
    check_model_path(path, field)
    try:
        return loader.from_pretrained(path, **kwargs)
    except errors as exc:
        raise UserError(f"cannot {what} '{path}': {str(exc).splitlines()[0]}", field=field) from None


def load_tokenizer(path: str, field: str = "policy.path"):
    from transformers import AutoTokenizer

    tokenizer = guarded_from_pretrained(AutoTokenizer, path, "load a tokenizer from", field)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, field: str = "policy.path", dtype=None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return guarded_from_pretrained(
        AutoModelForCausalLM, path, "load a causal LM from", field, dtype=dtype
    ).to(device)


def is_vision_language(path: str, field: str = "policy.path") -> bool:
    """Whether the model folder / Hub name holds a vision-language model (its config has a vision tower)."""
    from transformers import AutoConfig

    config = guarded_from_pretrained(AutoConfig, path, "read the model config of", field)
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str, field: str = "policy.path"):
    """The processor (image processor + tokenizer) saved with a vision-language model."""
    from transformers import AutoProcessor

    processor = guarded_from_pretrained(
        AutoProcessor, path, "load a processor from", field, errors=(OSError, ValueError, TypeError)
    )
    if not hasattr(processor, "image_processor"):
        raise UserError(
            f"'{path}' has a tokenizer but no image processor (not a vision-language model)", field=field
        )
    return processor


def load_vision_lm(path: str, field: str = "policy.path", dtype=None, device: str = "cpu"):
    """A vision-language model (Llava family: vision tower + projector + causal LM)."""
    from transformers import AutoModelForImageTextToText

    if not is_vision_language(path, field):
        raise UserError(
            f"'{path}' has no vision tower: the image task needs a vision-language model", field=field
        )
    model = guarded_from_pretrained(
        AutoModelForImageTextToText, path, "load a vision-language model from", field, dtype=dtype
    )
    return model.to(device)
