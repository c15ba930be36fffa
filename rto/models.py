"""Loading models and tokenizers from Hub names or local folders, with errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path

from rto.errors import UserError

ModelKind = str  # "causal_lm" | "sequence_classification" | "token_classification"
MODEL_KINDS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",  # reward model: one score
    "token_classification": "AutoModelForTokenClassification",  # critic: one value per token
}
VALUE_HEAD_FLAG = "rto_value_head"
"""Config attribute marking a saved vision-language critic (its ``lm_head`` has one output)."""


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
    if not is_vision_language(path, field):
        raise UserError(
            f"'{path}' has no vision tower: the image task needs a vision-language model", field=field
        )
    return _vision_lm(path, field, dtype).to(device)


def _vision_lm(path: str, field: str | None, dtype):
    from transformers import AutoModelForImageTextToText

    return guarded_from_pretrained(
        AutoModelForImageTextToText, path, "load a vision-language model from", field, dtype=dtype
    )


def load_model(path: str, kind: ModelKind = "causal_lm", dtype=None, field: str | None = None):
    """A model folder or Hub name as a causal LM, a sequence classifier (reward model, one score)
    or a token classifier (critic, one value per token; a reward model's folder loads too, its
    score head becoming the critic's value head). What the Ray workers load.

    A vision-language folder (its config has a ``vision_config``: Llava family) loads as
    ``AutoModelForImageTextToText`` for ``causal_lm`` and as the same model with a one-output value
    head in place of ``lm_head`` for ``token_classification`` (:func:`load_vision_critic`).
    A missing or unloadable folder is a `UserError` naming `field` when given."""
    import torch
    import transformers

    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    if is_vision_language(path, field):
        if kind == "causal_lm":
            return _vision_lm(path, field, dtype)
        if kind == "token_classification":
            return load_vision_critic(path, dtype, field)
        raise ValueError(f"model kind {kind!r} is not supported for vision-language models ({path})")
    auto_cls = getattr(transformers, MODEL_KINDS[kind])
    extra = {} if kind == "causal_lm" else {"num_labels": 1}
    what = {"causal_lm": "a causal LM", "sequence_classification": "a reward model"}.get(kind, "a critic")
    model, info = guarded_from_pretrained(
        auto_cls, path, f"load {what} from", field, dtype=dtype, output_loading_info=True, **extra
    )
    head = getattr(model, "score", None)
    if kind == "token_classification" and "score.bias" in info["missing_keys"] and head is not None:
        # A reward model's head has no bias; zero the new one so the critic starts as the RM's score.
        torch.nn.init.zeros_(head.bias)
    return model


def load_vision_critic(path: str, dtype=None, field: str | None = None):
    """A vision-language critic: the VLM with ``lm_head`` replaced by a zero-initialised linear value
    head (one value per token, read as ``logits[..., 0]`` like a token classifier's). A folder saved
    from such a critic (config flag ``rto_value_head``) gets its trained head back."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the replaced head as mismatched
    try:
        model = guarded_from_pretrained(
            transformers.AutoModelForImageTextToText,
            path,
            "load a vision-language critic from",
            field,
            dtype=dtype or torch.float32,
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, 1, bias=True, dtype=model.lm_head.weight.dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if getattr(model.config, VALUE_HEAD_FLAG, False):
        state = {}
        for shard in sorted(Path(path).glob("*.safetensors")):
            state.update({k: v for k, v in load_file(shard).items() if k.startswith("lm_head.")})
        head.load_state_dict({k.removeprefix("lm_head."): v for k, v in state.items()})
    model.lm_head = head
    # the value head is not the (tied) embedding matrix: saving must keep it, loading must not tie it
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    setattr(model.config, VALUE_HEAD_FLAG, True)
    return model
