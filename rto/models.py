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
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file() and not any(folder.glob("*.json")):
        raise UserError(f"cannot {what} '{path}': the folder holds no model (no config.json)", field=field)
    try:
        return loader.from_pretrained(path, **kwargs)
    except errors as exc:
        raise UserError(f"cannot {what} '{path}': {_one_sentence(exc)}", field=field) from None


def _one_sentence(exc: BaseException) -> str:
    """The first sentence of a loader's error (they run on with advice and links)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    end = line.find(". ")
    return line if end < 0 else line[: end + 1]


PAD_TOKEN = "<|pad|>"
"""The pad token added to a tokenizer that has none (or whose pad is its EOS)."""


def load_tokenizer(path: str, field: str = "policy.path"):
    """The tokenizer of a model folder / Hub name, with a pad token distinct from EOS (see
    :func:`ensure_pad_token`); every stage loads it this way, so all agree on the ids."""
    from transformers import AutoTokenizer

    tokenizer = guarded_from_pretrained(AutoTokenizer, path, "load a tokenizer from", field)
    ensure_pad_token(tokenizer, path, field)
    return tokenizer


def ensure_pad_token(tokenizer, path: str = "", field: str | None = None) -> None:
    """Give a tokenizer without a pad token, or whose pad token is its EOS (Llama-3, Mistral, GPT-2
    ship so), a distinct pad token `PAD_TOKEN` at the end of the vocabulary.

    With pad = EOS, a sequence classifier's own pooling (the rightmost token that is not the pad:
    how TRL's RewardTrainer trains a reward model) reads the token *before* the final EOS, while
    scoring a padded batch must read the EOS; with a distinct pad both read the EOS. The models
    get a matching embedding row when they are loaded (:func:`fit_embeddings`)."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{path}' has no EOS token: responses could not end", field=field)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    try:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
        raise UserError(f"cannot add a pad token to the tokenizer of '{path}': {exc}", field=field) from None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"cannot give the tokenizer of '{path}' a pad token distinct from EOS", field=field)


def fit_embeddings(model, tokenizer, path: str = "", field: str | None = None) -> None:
    """Make a text model agree with its (pad-completed) tokenizer: one new embedding row for a pad
    token that :func:`ensure_pad_token` added, set deterministically to the mean of the existing
    rows (input and, if untied, output embeddings) so that every stage loading the same folder gets
    the same model; and ``config.pad_token_id``. A tokenizer larger than that is a `UserError`."""
    import torch

    embeddings = model.get_input_embeddings()
    rows, needed = embeddings.num_embeddings, len(tokenizer)
    if needed > rows:
        if tokenizer.pad_token != PAD_TOKEN or needed != rows + 1 or tokenizer.pad_token_id != rows:
            raise UserError(
                f"the tokenizer of '{path}' has {needed} tokens but the model's vocabulary only {rows}",
                field=field,
            )
        output = model.get_output_embeddings()
        tied = output is not None and output.weight is embeddings.weight
        try:
            model.resize_token_embeddings(needed, mean_resizing=False)
        except (NotImplementedError, ValueError, AttributeError, TypeError) as exc:
            raise UserError(
                f"cannot add the pad token's embedding to the model '{path}': {exc}", field=field
            ) from None
        with torch.no_grad():
            grown = model.get_input_embeddings().weight
            grown[rows:] = grown[:rows].mean(dim=0)
            output = model.get_output_embeddings()
            if output is not None and not tied and output.weight is not grown:
                output.weight[rows:] = output.weight[:rows].mean(dim=0)
                if getattr(output, "bias", None) is not None:
                    output.bias[rows:] = output.bias[:rows].mean()
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _folder_tokenizer(path: str, field: str | None):
    """The pad-completed tokenizer saved with a model, or None if the folder has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None
    ensure_pad_token(tokenizer, path, field)
    return tokenizer


def load_causal_lm(path: str, field: str = "policy.path", dtype=None, device: str = "cpu"):
    return load_model(path, "causal_lm", dtype, field).to(device)


def sampling_token_ids(tokenizer, vocab_size: int | None = None) -> dict:
    """What every sampler (dense, FTP, AdaptInfer) is told about tokens: ``eos_token_id`` (the one
    token that ends a response: the chat template's end of turn), ``pad_token_id``, and
    ``suppress_token_ids``: every special token but EOS (pad, BOS, template markers, alternative
    end tokens, image placeholders) and the model's embedding rows the tokenizer has no token for
    (`vocab_size` > len(tokenizer), as in Qwen); none of them may ever be sampled."""
    eos = tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    if vocab_size is not None and vocab_size > len(tokenizer):
        special |= set(range(len(tokenizer), vocab_size))
    special.discard(eos)
    return {
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "suppress_token_ids": sorted(i for i in special if i is not None),
    }


def model_sampling_token_ids(path: str, field: str | None = "policy.path") -> dict:
    """:func:`sampling_token_ids` of the tokenizer saved with a model folder (a vision-language
    model's too), loaded as the stages load it; vocabulary size from the model's config."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(path, field)
    config = guarded_from_pretrained(AutoConfig, path, "read the model config of", field)
    return sampling_token_ids(tokenizer, config.get_text_config().vocab_size)


def disable_dropout(model) -> None:
    """Turn every dropout of a model off (``nn.Dropout`` modules and the float ``*dropout``
    attributes attention layers read in training mode), so that its training forward computes
    exactly what its scoring forward computes: PPO's ratio and clipped value loss compare the two.
    The config keeps its values (a saved model is unchanged for later fine-tuning)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


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
    tokenizer = _folder_tokenizer(path, field)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer, path, field)
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
