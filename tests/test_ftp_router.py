"""FTP router pieces: factors, selection rules, losses, router files, config validation, bad input."""

import json

import pytest
import torch
from pydantic import ValidationError

from prune.ftp.config import FTPConfig
from prune.ftp.factors import attention_ranks, relative_positions
from prune.ftp.forward import skipping_forward
from prune.ftp.losses import distill_kl, guide_loss, guide_weight, sparsity_loss
from prune.ftp.models import random_causal_lm
from prune.ftp.router import (
    Router,
    check_router_folder,
    load_router,
    model_fingerprint,
    save_router,
    select_threshold,
    select_topk,
    tokenizer_fingerprint,
)
from rto.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_relative_positions_and_ranks():
    rel = relative_positions(torch.tensor([[0, 1, 2, 4]]), torch.tensor([4]))
    assert rel.tolist() == [[0.0, 0.25, 0.5, 1.0]]
    table = torch.tensor([[0.1, 0.9, 0.5, 0.0]])
    seen = torch.tensor([[True, True, True, False]])
    assert attention_ranks(table, seen).tolist() == [[1.0, 0.0, 0.5, 1.0]]


def test_select_topk_counts_and_forced_first():
    logits = torch.tensor([[-5.0, 1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 9.0, 8.0, 7.0]])
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    first = torch.tensor([[True, False, False, False, False], [False, False, True, False, False]])
    keep = select_topk(logits, valid, first, sparsity=0.4)
    assert keep.tolist() == [[True, False, True, True, False], [False, False, True, True, False]]
    assert select_threshold(
        torch.tensor([[0.1, -0.1]]), torch.ones(1, 2, dtype=torch.bool), 0.5
    ).tolist() == [[True, False]]


def test_losses_by_hand():
    probs = [torch.tensor([[0.5, 0.5, 1.0, 1.0]])]
    valid = [torch.ones(1, 4, dtype=torch.bool)]
    # actual sparsity 0.25: below a 0.5 target costs 0.25, above a 0.1 target costs nothing
    assert float(sparsity_loss(probs, valid, [0.5])) == pytest.approx(0.25)
    assert float(sparsity_loss(probs, valid, [0.1])) == 0.0
    guide = [torch.tensor([[True, False, True, True]])]
    expected = -(2 * torch.log(torch.tensor(0.5)) + 2 * torch.log(torch.tensor(1 - 1e-6))) / 4
    assert float(guide_loss(probs, guide, valid)) == pytest.approx(float(expected), rel=1e-4)
    teacher = torch.tensor([[[0.0, 0.0]]])
    student = torch.tensor([[[0.0, torch.log(torch.tensor(3.0))]]])  # p = (1/4, 3/4) vs (1/2, 1/2)
    kl = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert float(distill_kl(teacher, student, torch.ones(1, 1, dtype=torch.bool))) == pytest.approx(
        float(kl), rel=1e-5
    )
    assert guide_weight(2, 1.0, 0.5) == 0.25


def test_router_file_round_trip(tmp_path):
    model = random_causal_lm("llama")
    router = Router(hidden=16)
    save_router(tmp_path, router, [0.0, 0.2, 0.4, 0.6], model_fingerprint(model), sparsity=0.3)
    loaded, schedule, meta = load_router(tmp_path, model)
    assert schedule == [0.0, 0.2, 0.4, 0.6] and meta["sparsity"] == 0.3
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), router(x))


def test_router_file_for_another_model_is_a_user_error(tmp_path):
    model = random_causal_lm("llama")
    save_router(tmp_path, Router(), [0.3] * 4, model_fingerprint(model))
    other = random_causal_lm("llama", num_hidden_layers=2)
    with pytest.raises(UserError, match=r"ftp\.json.*num_hidden_layers"):
        load_router(tmp_path, other)
    with pytest.raises(UserError, match="model_type"):
        load_router(tmp_path, random_causal_lm("qwen2"))
    (tmp_path / "ftp.json").write_text(json.dumps({"oops": 1}))
    with pytest.raises(UserError, match="ftp.json"):
        load_router(tmp_path, model)
    with pytest.raises(UserError, match="not an FTP router folder"):
        load_router(tmp_path / "missing", model)


def test_router_folders_are_checked_against_the_policy_before_loading_it(tmp_path):
    """The driver's check (before any actor): architecture, depth, width, tokenizer and task
    variant, each named with what the router expects and what the policy has."""
    from pipelines.tasks.text import build_tokenizer
    from pipelines.tasks.text_facts import facts_vocabulary

    model, tokenizer = random_causal_lm("llama"), build_tokenizer()
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    policy, plain = str(tmp_path / "policy"), {"name": "text", "variant": "plain"}

    def folder(**meta):
        fields = {"tokenizer": tokenizer_fingerprint(tokenizer), "task": plain, **meta}
        fingerprint = fields.pop("fingerprint", model_fingerprint(model))
        save_router(tmp_path / "ftp", Router(), [0.3] * 4, fingerprint, **fields)
        return tmp_path / "ftp"

    assert check_router_folder(folder(), policy, plain)["task"] == plain
    deeper = random_causal_lm("llama", num_hidden_layers=6)
    other_words = tokenizer_fingerprint(build_tokenizer(words=facts_vocabulary()))
    for meta, field, words in [
        ({"fingerprint": model_fingerprint(deeper)}, "num_hidden_layers", ["6", "(the policy's: 4)"]),
        ({"fingerprint": {**model_fingerprint(model), "hidden_size": 96}}, "hidden_size", ["96"]),
        ({"tokenizer": other_words}, "vocab_size", ["another model"]),
        ({"task": {"name": "text", "variant": "facts"}}, "task.variant", ["another task", "'facts'"]),
    ]:
        with pytest.raises(UserError) as caught:
            check_router_folder(folder(**meta), policy, plain)
        message = str(caught.value)
        assert message.startswith(str(tmp_path / "ftp" / "ftp.json")) and field in message, message
        for word in words:
            assert word in message, (word, message)
    # folders written before the tokenizer and the task were recorded: checked on the model alone
    legacy = json.loads((folder() / "ftp.json").read_text())
    legacy.pop("tokenizer"), legacy.pop("task")
    (tmp_path / "ftp" / "ftp.json").write_text(json.dumps(legacy))
    assert check_router_folder(tmp_path / "ftp", policy, {"name": "text", "variant": "facts"})


def test_unsupported_architecture_is_a_user_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50)).eval()
    with pytest.raises(UserError, match=r"model_type.*'gpt2' is not supported"):
        skipping_forward(model, torch.ones(1, 4, dtype=torch.long), schedule=[0.0, 0.0])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"sparsity": 1.0}, "sparsity must be in \\[0, 1\\), got 1.0"),
        ({"sparsity": -0.1}, "sparsity must be in \\[0, 1\\)"),
        ({"decode_threshold": 1.5}, "decode_threshold must be in \\[0, 1\\) or 'calibrated'"),
        ({"decode_threshold": "auto"}, "calibrated"),
        ({"max_block_sparsity": 1.0}, "max_block_sparsity must be in \\(0, 1\\)"),
        ({"sparsity": 0.7, "max_block_sparsity": 0.5}, "cannot be reached"),
        ({"router": "mlp"}, "router must be"),
        ({"search": {"population": 2, "elite": 2}}, "elite"),
        ({"sparsityy": 0.3}, "sparsityy"),
    ],
)
def test_config_rejects_bad_values(settings, message):
    with pytest.raises(ValidationError, match=message):
        FTPConfig(**settings)


def test_config_defaults_are_valid():
    config = FTPConfig()
    assert 0 <= config.sparsity < 1 and config.train.steps > 0
