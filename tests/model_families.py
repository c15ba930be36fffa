"""Tiny random-init models of four real model families, built entirely locally.

Conformance tests run the pipeline on "models like the ones users bring": each family here keeps
the conventions that trip pipelines up (special tokens, missing pad token, chat template, newline
tokens, generation config, config quirks) at a size that trains in seconds. The words are those of
the built-in text task (`pipelines.tasks.text`), without that task's own special tokens.

    llama3   Llama-3-Instruct: header tokens, <|eot_id|> ends a turn, no pad token
    qwen2    Qwen2-Instruct ChatML: "<|im_end|>\\n", pad <|endoftext|> != eos, padded vocab_size
    mistral  Mistral-Instruct: <s>[INST] ... [/INST] answer</s>, no pad token, left padding
    gpt2     GPT-2: <|endoftext|> is bos = eos = unk, no pad token, no chat template, dropout 0.1
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
)

from pipelines.tasks import text

FAMILIES: tuple[str, ...] = ("llama3", "qwen2", "mistral", "gpt2")
MAX_LENGTH = 256
"""Context length of every family (model max_position_embeddings and tokenizer model_max_length)."""

QWEN_SYSTEM = "You are a helpful assistant."
"""Qwen2-Instruct's default system message (its words are added to the vocabulary)."""

SIZES = {
    "policy": dict(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2),
    "rm": dict(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1),
}

# ---------------------------------------------------------------- chat templates (as shipped)

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (  # Qwen2-7B-Instruct
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# ---------------------------------------------------------------- tokenizers


def words() -> list[str]:
    """The task's words and ".", plus the role names and Qwen's system-message words."""
    task = [w for w in text.vocabulary() if w not in set(text.SPECIAL_TOKENS.values())]
    extra = ["system", "user", "assistant", *QWEN_SYSTEM.rstrip(".").split()]
    return list(dict.fromkeys(task + extra))


def _word_level(vocab: list[str], unk: str, bos: str | None = None, **kwargs) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab` (ids are positions) whose pieces are the words, "." and
    the newlines ("\\n\\n" is one token, as in Llama-3's byte-level BPE); spaces are dropped and the
    decoder joins pieces with spaces. `unk` is what the model maps unknown words to; `bos`, if
    given, is prepended by the post-processor in tokenizer.json, as the real Llama-3 and Mistral
    tokenizers do (transformers 5 does not save `add_bos_token`: tokenizer.json is the truth)."""
    ids = {w: i for i, w in enumerate(vocab)}
    core = Tokenizer(models.WordLevel(vocab=ids, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n\n|\n"), behavior="isolated"),
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if bos is not None:
        kwargs["bos_token"] = bos
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1", special_tokens=[(bos, ids[bos])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=MAX_LENGTH, **kwargs)


def _llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3: specials after the words (from id 128000 in the real one), in Meta's order; BOS
    prepended by the tokenizer, eos = <|eot_id|>, no pad and no unk token. Unknown words map to
    <|reserved_special_token_3|> (the real byte-level BPE has no unknowns)."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(4)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", *reserved]
    specials += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return _word_level(
        ["\n", "\n\n", *words(), *specials],
        unk=reserved[-1],
        bos="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        extra_special_tokens=[t for t in specials if t not in ("<|begin_of_text|>", "<|eot_id|>")],
        padding_side="right",
        chat_template=LLAMA3_TEMPLATE,
    )


def _mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral: <unk>, <s>, </s> are ids 0, 1, 2 and [INST], [/INST] control tokens 3, 4 (as in
    v0.3); BOS prepended by the tokenizer, no pad token, left padding (LlamaTokenizer's default)."""
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    return _word_level(
        [*specials, "\n", "\n\n", *words()],
        unk="<unk>",
        unk_token="<unk>",
        bos="<s>",
        eos_token="</s>",
        extra_special_tokens=["[INST]", "[/INST]"],
        padding_side="left",
        chat_template=MISTRAL_TEMPLATE,
    )


def _gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2: the one special <|endoftext|> is the last id and is bos, eos and unk; nothing is
    prepended, no pad token, no chat template."""
    return _word_level(
        ["\n", "\n\n", *words(), "<|endoftext|>"],
        unk="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        padding_side="right",
    )


def _qwen2_tokenizer() -> Qwen2Tokenizer:
    """Qwen2: the real `Qwen2Tokenizer` (byte-level BPE, "\\n" is the token "Ċ") over merges
    trained here so that every word is one token; specials after the words; eos <|im_end|>, pad
    <|endoftext|>, no bos and no unk token.

    Not a word-level model like the other families: `AutoTokenizer` loads any directory whose
    config says `model_type: qwen2` with `Qwen2Tokenizer` whatever `tokenizer_class` says, and
    that class rebuilds a byte-level BPE from the saved vocabulary (a word-level vocabulary then
    encodes every word to nothing)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Qwen2Tokenizer().backend_tokenizer  # Qwen2's normalizer, pre-tokenizer and decoder
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # merge until every word of the corpus is a single token
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
    )
    corpus = [f"{w} {w}" for w in words()] + [QWEN_SYSTEM]  # each word with and without a space
    core.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(core.to_str())["model"]
    pieces = sorted((i, t) for t, i in trained["vocab"].items() if t not in specials)
    vocab = {t: n for n, (_, t) in enumerate(pieces)}
    vocab.update({t: len(pieces) + k for k, t in enumerate(specials)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in trained["merges"]],
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=MAX_LENGTH,
        padding_side="right",
        chat_template=QWEN2_TEMPLATE,
    )


_TOKENIZERS = {
    "llama3": _llama3_tokenizer,
    "qwen2": _qwen2_tokenizer,
    "mistral": _mistral_tokenizer,
    "gpt2": _gpt2_tokenizer,
}


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The family's tokenizer (a fresh object each call)."""
    return _TOKENIZERS[_check(family)]()


def is_chat_family(family: str) -> bool:
    """Whether the family has a chat template (and so takes conversational data)."""
    return _check(family) != "gpt2"


def _check(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    return family


# ---------------------------------------------------------------- models


def _model_config(family: str, tok, size: str):
    s = SIZES[size]
    ids = tok.convert_tokens_to_ids
    llama_like = dict(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],  # grouped-query attention
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=None,
    )
    if family == "llama3":
        config = LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=True,  # as Llama-3.2-1B/3B
            **llama_like,
        )
        generation = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")],
            do_sample=True,
            temperature=0.6,
            top_p=0.9,
        )
    elif family == "qwen2":
        config = Qwen2Config(
            vocab_size=64 * (len(tok) // 64 + 1),  # unused padding rows, like 152064 > 151646
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            tie_word_embeddings=False,  # as Qwen2-7B
            **llama_like,
        )
        generation = GenerationConfig(
            bos_token_id=ids("<|endoftext|>"),
            pad_token_id=ids("<|endoftext|>"),
            eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
            do_sample=True,
            temperature=0.7,
            top_p=0.8,
            top_k=20,
            repetition_penalty=1.05,
        )
    elif family == "mistral":
        config = MistralConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            sliding_window=None,  # v0.2 onwards
            tie_word_embeddings=False,
            **llama_like,
        )
        generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        config = GPT2Config(  # GPT-2's default dropouts: resid/embd/attn/summary_first 0.1
            vocab_size=len(tok),
            n_positions=MAX_LENGTH,
            n_embd=s["hidden"],
            n_layer=s["layers"],
            n_head=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return config, generation


def save_family_model(family: str, directory: Path, *, size: str = "policy", seed: int = 0) -> Path:
    """Save a random-init model of `family` (size "policy" or the smaller "rm") with its tokenizer
    and generation config into `directory`, loadable with `AutoModelForCausalLM.from_pretrained`
    and `AutoTokenizer.from_pretrained`. The weights depend only on `seed`; the global RNG is left
    as it was."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    directory = Path(directory)
    tok = build_tokenizer(family)
    config, generation = _model_config(family, tok, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = generation
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- data


def _plain(record: dict) -> dict:
    """A conversational TRL record as a standard one: each turn list becomes its content."""
    return {key: " ".join(m["content"] for m in turns) for key, turns in record.items()}


def write_family_data(
    family: str,
    directory: Path,
    *,
    n_sft: int = 128,
    n_pairs: int = 64,
    n_eval_pairs: int = 32,
    n_prompts: int = 32,
    n_eval: int = 8,
    seed: int = 0,
) -> dict[str, Path]:
    """The text task's data as TRL JSONL files (as `pipelines/prepare.py` generates it): keys
    "sft" (prompt/completion), "pairs" and "eval_pairs" (prompt/chosen/rejected), "prompts" and
    "eval_prompts" (prompt). Conversational for chat families, plain strings for gpt2."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = text.TaskSettings(seed=seed, n_sft=n_sft, n_pairs=n_pairs, n_prompts=n_prompts, n_eval=n_eval)
    generated = {
        "sft": text.sft_records(settings),
        "pairs": text.preference_records(settings, split="train"),
        "eval_pairs": text.preference_records(settings, n_eval_pairs, split="eval"),
        "prompts": text.prompt_records(settings, n_prompts, "train"),
        "eval_prompts": text.prompt_records(settings, n_eval, "eval"),
    }
    paths = {}
    for role, records in generated.items():
        if not is_chat_family(family):
            records = [_plain(r) for r in records]
        paths[role] = directory / f"{role}.jsonl"
        text.write_jsonl(paths[role], records)
    return paths
