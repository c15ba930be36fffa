"""The local stand-ins for real model families keep the conventions they are meant to reproduce."""

from __future__ import annotations

import json

import pytest
import torch
from model_families import (
    FAMILIES,
    build_tokenizer,
    is_chat_family,
    save_family_model,
    write_family_data,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.tasks import text
from rto.generation import encode_completion, encode_prompt

CHAT_FAMILIES = [f for f in FAMILIES if is_chat_family(f)]
PROMPT = [{"role": "user", "content": "describe the cat"}]
COMPLETION = [{"role": "assistant", "content": "the kind cat loves a dog . my cat sees the sun ."}]

EXPECTED = {  # bos, eos, pad, unk, model_type
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", None, None, "llama"),
    "qwen2": (None, "<|im_end|>", "<|endoftext|>", None, "qwen2"),
    "mistral": ("<s>", "</s>", None, "<unk>", "mistral"),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>", "gpt2"),
}


def render(tok, messages, **kwargs) -> list[str]:
    encoded = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return tok.convert_ids_to_tokens(list(encoded["input_ids"]))


def newline(tok) -> str:
    """The token that stands for "\\n" ("Ċ" in Qwen's byte-level BPE)."""
    (token,) = tok.tokenize("\n")
    return token


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> directory of its saved policy-size model (saved once per module)."""
    root = tmp_path_factory.mktemp("families")
    return {f: save_family_model(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens(family):
    tok = build_tokenizer(family)
    bos, eos, pad, unk, _ = EXPECTED[family]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (bos, eos, pad, unk)
    if pad is not None:
        assert tok.pad_token_id != tok.eos_token_id
    vocab = tok.get_vocab()
    own = {"<unk>"} if family == "mistral" else set()
    assert not (set(text.SPECIAL_TOKENS.values()) - own) & set(vocab)  # not the task's specials
    assert {"cat", "loves", "."} <= set(vocab)
    assert len(tok.tokenize(" ".join(text.vocabulary()[6:]))) == len(text.vocabulary()) - 6


def test_llama3_template():
    tok = build_tokenizer("llama3")
    tokens = render(tok, PROMPT, add_generation_prompt=True)
    assert tokens[:5] == ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n\n"]
    assert tokens[-4:] == ["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"]
    assert render(tok, PROMPT + COMPLETION)[-2:] == [".", "<|eot_id|>"]
    assert tok("the cat")["input_ids"][0] == tok.bos_token_id  # BOS prepended to plain text too


def test_qwen2_template():
    tok = build_tokenizer("qwen2")
    nl = newline(tok)
    tokens = render(tok, PROMPT + COMPLETION)
    assert tokens[-2:] == ["<|im_end|>", nl]  # the newline after <|im_end|> is a real token
    assert tokens[:3] == ["<|im_start|>", "system", nl]  # default system message
    system = tokens[3 : tokens.index("<|im_end|>")]
    assert tok.convert_tokens_to_string(system) == "You are a helpful assistant."
    assert render(tok, PROMPT, add_generation_prompt=True)[-3:] == ["<|im_start|>", "assistant", nl]
    assert tok("the cat")["input_ids"] == tok("the cat", add_special_tokens=False)["input_ids"]  # no BOS


def test_mistral_template():
    tok = build_tokenizer("mistral")
    prompt = render(tok, PROMPT, add_generation_prompt=True)
    assert prompt == ["<s>", "[INST]", "describe", "the", "cat", "[/INST]"]
    assert render(tok, PROMPT) == prompt  # the generation prompt adds nothing
    assert render(tok, PROMPT + COMPLETION)[-2:] == [".", "</s>"]
    assert tok.padding_side == "left"


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_encode_completion(family):
    tok = build_tokenizer(family)
    prompt_ids, completion_ids = encode_completion(tok, PROMPT, COMPLETION)
    assert prompt_ids == encode_prompt(tok, PROMPT)
    assert completion_ids[-1] == tok.eos_token_id and completion_ids.count(tok.eos_token_id) == 1
    decoded = tok.decode(completion_ids, skip_special_tokens=True).strip()
    assert decoded.split() == COMPLETION[0]["content"].split()


def test_gpt2_plain_strings():
    tok = build_tokenizer("gpt2")
    assert tok.chat_template is None and not is_chat_family("gpt2")
    prompt_ids, completion_ids = encode_completion(tok, "describe the cat", "the cat sees a dog .")
    assert tok.convert_ids_to_tokens(prompt_ids) == ["describe", "the", "cat"]  # nothing prepended
    assert completion_ids[-1] == tok.eos_token_id == tok.bos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_newline_is_a_token(family):
    tok = build_tokenizer(family)
    tokens = tok.tokenize("the cat\nthe dog")
    assert len(tokens) == 5 and tok.convert_tokens_to_string([tokens[2]]).strip(" ") == "\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_reload(family, saved):
    fresh = build_tokenizer(family)
    tok = AutoTokenizer.from_pretrained(saved[family])
    assert type(tok) is type(fresh)
    assert tok.special_tokens_map == fresh.special_tokens_map
    assert tok.all_special_tokens == fresh.all_special_tokens
    assert tok.pad_token == EXPECTED[family][2]
    assert tok.chat_template == fresh.chat_template
    assert tok.get_vocab() == fresh.get_vocab()
    sample = "describe the cat .\nthe dog loves my cat ."
    assert tok(sample)["input_ids"] == fresh(sample)["input_ids"]
    if is_chat_family(family):
        assert encode_completion(tok, PROMPT, COMPLETION) == encode_completion(fresh, PROMPT, COMPLETION)

    model = AutoModelForCausalLM.from_pretrained(saved[family])
    assert model.config.model_type == EXPECTED[family][4]
    assert model.config.pad_token_id is None
    eos = model.generation_config.eos_token_id
    if family in ("llama3", "qwen2"):  # end of text and end of turn both stop generation
        assert isinstance(eos, list) and tok.eos_token_id in eos and len(eos) == 2
    else:
        assert eos == tok.eos_token_id
    prompt = torch.tensor([encode_prompt(tok, PROMPT if is_chat_family(family) else "describe the cat")])
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, min_new_tokens=3, do_sample=False
    )
    assert out.shape == (1, prompt.shape[1] + 3)


def test_qwen2_vocab_is_padded(saved):
    tok = build_tokenizer("qwen2")
    model = AutoModelForCausalLM.from_pretrained(saved["qwen2"])
    assert model.config.vocab_size > len(tok) and model.config.vocab_size % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_gpt2_has_dropout(saved):
    model = AutoModelForCausalLM.from_pretrained(saved["gpt2"])
    c = model.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop, c.summary_first_dropout) == (0.1, 0.1, 0.1, 0.1)
    assert AutoTokenizer.from_pretrained(saved["gpt2"]).chat_template is None


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_seed_and_size(family, tmp_path, saved):
    state = {
        name: AutoModelForCausalLM.from_pretrained(
            save_family_model(family, tmp_path / name, size="rm", seed=s)
        )
        for name, s in [("a", 1), ("b", 1), ("c", 2)]
    }
    a, b, c = (list(state[k].state_dict().values()) for k in "abc")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    policy = AutoModelForCausalLM.from_pretrained(saved[family])
    assert state["a"].num_parameters() < policy.num_parameters()


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_write_family_data(family, tmp_path):
    paths = write_family_data(family, tmp_path, n_sft=5, n_pairs=4, n_eval_pairs=3, n_prompts=2, n_eval=1)
    assert set(paths) == {"sft", "pairs", "eval_pairs", "prompts", "eval_prompts"}
    data = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert {k: len(v) for k, v in data.items()} == {
        "sft": 5, "pairs": 4, "eval_pairs": 3, "prompts": 2, "eval_prompts": 1,
    }  # fmt: skip
    keys = {"sft": {"prompt", "completion"}, "pairs": {"prompt", "chosen", "rejected"}}
    keys |= {"eval_pairs": keys["pairs"], "prompts": {"prompt"}, "eval_prompts": {"prompt"}}
    settings = text.TaskSettings(n_sft=5)
    for role, records in data.items():
        for record in records:
            assert set(record) == keys[role]
            for key, value in record.items():
                if is_chat_family(family):
                    role_name = "user" if key == "prompt" else "assistant"
                    assert [m["role"] for m in value] == [role_name]
                else:
                    assert isinstance(value, str) and value
    if is_chat_family(family):
        assert data["sft"] == text.sft_records(settings)
    else:
        first = text.sft_records(settings)[0]
        assert data["sft"][0] == {
            "prompt": first["prompt"][0]["content"],
            "completion": first["completion"][0]["content"],
        }


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown model family"):
        build_tokenizer("bloom")
