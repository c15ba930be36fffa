"""Loading real families' models: a pad token distinct from EOS (so a reward model is scored at the
token TRL trained it on), embeddings that agree with it in every stage, no dropout in PPO's
trainable models, and one-line errors for a model that cannot be laid out as PPO needs."""

from __future__ import annotations

import pytest
import torch
from model_families import FAMILIES, build_tokenizer, save_family_model

from rto.errors import UserError
from rto.models import PAD_TOKEN, disable_dropout, ensure_pad_token, load_model, load_tokenizer


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_family_model(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tokenizer_gets_a_pad_distinct_from_eos(family_dirs, family):
    tokenizer = load_tokenizer(str(family_dirs[family]))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    if family == "qwen2":  # Qwen2-Instruct has one already (<|endoftext|>, not its EOS <|im_end|>)
        assert tokenizer.pad_token == "<|endoftext|>"
    else:
        assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == len(build_tokenizer(family))


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_every_load_of_a_folder_gets_the_same_pad_row(family_dirs, family):
    """The policy, reference, rollout copy and critic are loaded separately: their pad rows must
    agree (they enter every log-softmax), and the config must name the pad for pooling."""
    path = str(family_dirs[family])
    tokenizer = load_tokenizer(path)
    a, b = load_model(path, "causal_lm"), load_model(path, "causal_lm")
    rm = load_model(path, "sequence_classification")
    for model in (a, b, rm):
        assert model.get_input_embeddings().num_embeddings == len(tokenizer)
        assert model.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(a.get_input_embeddings().weight, b.get_input_embeddings().weight)
    torch.testing.assert_close(a.get_output_embeddings().weight, b.get_output_embeddings().weight)
    pad = a.get_input_embeddings().weight[tokenizer.pad_token_id]
    torch.testing.assert_close(pad, a.get_input_embeddings().weight[:-1].mean(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_is_scored_at_the_token_trl_trains_it_on(family_dirs, family):
    """TRL's RewardTrainer trains through the model's own pooling (the rightmost token that is not
    the pad) on right-padded pairs; PPO scores padded rollouts with `sequence_scores` (the last
    attention-mask position). On the same padded batch the two read the same token: the EOS."""
    from rto.forward import sequence_scores
    from rto.generation import encode_completion, pack

    path = str(family_dirs[family])
    tokenizer = load_tokenizer(path)
    rm = load_model(path, "sequence_classification").eval()
    chat = family != "gpt2"
    encoded = []
    for prompt, response in [
        ("describe the cat", "the cat sees a dog ."),
        ("tell me about the sun", "the sun ."),
    ]:
        if chat:
            prompt, response = (
                [{"role": "user", "content": prompt}],
                [{"role": "assistant", "content": response}],
            )
        encoded.append(encode_completion(tokenizer, prompt, response))
    for _, completion in encoded:
        assert completion[-1] == tokenizer.eos_token_id  # template text after EOS is cut
    prompts = [p for p, _ in encoded]
    completions = [c for _, c in encoded]
    sequences, mask, _, _ = pack(prompts, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(rm, sequences, mask)
        # TRL's collator right-pads prompt + completion; the model pools by itself
        width = max(len(p) + len(c) for p, c in encoded)
        trl_rows = [p + c + [tokenizer.pad_token_id] * (width - len(p) - len(c)) for p, c in encoded]
        trl = rm(input_ids=torch.tensor(trl_rows)).logits[:, 0]
    torch.testing.assert_close(ours, trl, atol=1e-5, rtol=0)


def test_rm_training_rows_end_at_eos_like_rollouts():
    """ChatML puts a newline after <|im_end|>: TRL would train the reward model on it, while a
    rollout ends at <|im_end|>; the rm stage's pre-tokenized rows end at EOS."""
    from pipelines.stages.rm import tokenized_pairs

    tokenizer = build_tokenizer("qwen2")
    ensure_pad_token(tokenizer)
    pair = {
        "prompt": [{"role": "user", "content": "describe the cat"}],
        "chosen": [{"role": "assistant", "content": "the cat sees a dog ."}],
        "rejected": [{"role": "assistant", "content": "cat cat"}],
    }
    rendered = tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=True)["input_ids"]
    assert rendered[-1] != tokenizer.eos_token_id  # the template's own rendering ends with "\n"
    (row,) = tokenized_pairs(tokenizer, [pair])
    for ids in (row["chosen_ids"], row["rejected_ids"]):
        assert (
            ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 3
        )  # system, user, reply
        assert rendered[: len(row["chosen_ids"])] == row["chosen_ids"]


@pytest.mark.parametrize(
    ("family", "kind"),
    [("gpt2", "causal_lm"), ("gpt2", "token_classification"), ("llama3", "token_classification")],
)
def test_trainable_models_run_without_dropout(family_dirs, family, kind):
    """GPT-2 configs carry dropout 0.1, and transformers' token-classification head (PPO's critic)
    has dropout 0.1 even on Llama: with dropout off the training forward equals the scoring one."""
    model = load_model(str(family_dirs[family]), kind)
    ids = torch.randint(0, 50, (2, 12))
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(model.train()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    saved = model.config.to_dict()
    disable_dropout(model)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert model.config.to_dict() == saved  # what save_pretrained writes is the user's config


def test_a_tokenizer_larger_than_the_model_is_a_user_error(family_dirs, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "bigger"
    save_family_model("mistral", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["zebra", "yak"])
    tokenizer.save_pretrained(folder)
    with pytest.raises(UserError, match="has .* tokens but the model's vocabulary only") as error:
        load_model(str(folder), "causal_lm", field="policy.path")
    assert error.value.field == "policy.path" and str(folder) in str(error.value)


def test_a_tokenizer_that_cannot_take_a_pad_token_is_a_user_error(monkeypatch):
    tokenizer = build_tokenizer("mistral")

    def refuse(*_args, **_kwargs):  # the fault: a tokenizer class that cannot add tokens
        raise NotImplementedError("this tokenizer cannot add tokens")

    monkeypatch.setattr(tokenizer, "add_special_tokens", refuse)
    with pytest.raises(UserError, match="cannot add a pad token") as error:
        ensure_pad_token(tokenizer, "some/model", "policy.path")
    assert error.value.field == "policy.path"


def test_a_chat_template_without_eos_is_a_user_error(tmp_path):
    """A template whose assistant turn never ends with EOS: no response could end, and no RM be
    scored where it was trained; the job is refused when its data is prepared (exit 2)."""
    import json

    from model_families import write_family_data
    from pipeline_helpers import rto_in_process
    from transformers import AutoTokenizer

    folder = save_family_model("mistral", tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = tokenizer.chat_template.replace("+ eos_token", "")
    tokenizer.save_pretrained(folder)
    data = write_family_data("mistral", tmp_path / "data")
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "stages": ["sft"], "task": None, "device": "cpu",
                "policy": {"path": str(folder)}, "reward_model": {"path": str(folder)},
                "data": {"sft": {"path": str(data["sft"])}},
            }
        )
    )  # fmt: skip
    result = rto_in_process("run", str(job), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "policy.path" in last and "never emits the EOS token" in last and "Traceback" not in result.stderr
