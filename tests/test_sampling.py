"""Every rollout sampler (dense HF generate, FTP, AdaptInfer) reports its log-probs the same way:
log softmax(logits / T) of its model, before top-p/top-k truncation; so a pruned sampler that keeps
everything reports exactly the dense policy's log-probs at the sampling temperature, which is how
PPO scores the policy. And no sampler ever emits the pad token or a special token other than EOS."""

from __future__ import annotations

import pytest
import torch
from model_families import save_family_model

from rto.distributed.rollout import RolloutWorker
from rto.forward import response_logprobs
from rto.generation import encode_prompt, left_pad, sample
from rto.models import load_tokenizer, model_sampling_token_ids

T, TOP_P = 0.7, 0.9
QUESTIONS = ["describe the cat", "tell me about the dog", "write about the sun", "talk about a king"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A Llama-3-like policy (no pad token: one is added) and a static, zero-sparsity FTP router."""
    from prune.ftp.router import Router, model_fingerprint, save_router
    from rto.models import load_model

    root = tmp_path_factory.mktemp("sampling")
    path = save_family_model("llama3", root / "policy")
    model = load_model(str(path))
    layers = model.config.num_hidden_layers
    save_router(
        root / "ftp", Router(), [0.0] * layers, model_fingerprint(model), kind="static", decode_thresholds=0.0
    )
    return {"path": str(path), "ftp": str(root / "ftp")}


def prompt_batch(path: str, n: int = 8) -> dict:
    tokenizer = load_tokenizer(path)
    ids = [encode_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[i % 4]}]) for i in range(n)]
    input_ids, mask = left_pad(ids, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": mask}


def worker(policy, sampler: str, **settings) -> RolloutWorker:
    from prune.ftp.rollout import make_generate_fn

    fn = {"generate_fn": make_generate_fn(policy["ftp"])} if sampler == "ftp" else {}
    return RolloutWorker(policy["path"], **fn, **settings)


def favour(model, token_ids: list[int], bonus: float = 30.0):
    """Fault injection: make the model put nearly all its mass on `token_ids`."""
    index = torch.tensor(token_ids)

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., index] += bonus
        return logits

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("sampler", ["dense", "ftp"])
def test_text_sampler_logprobs_are_the_policys_at_the_sampling_temperature(policy, sampler):
    rollout = worker(policy, sampler, max_new_tokens=10, temperature=T, top_p=TOP_P)
    batch = prompt_batch(policy["path"])
    torch.manual_seed(0)
    out = rollout.generate(batch)
    mask = out["response_mask"].bool()
    dense = response_logprobs(
        rollout.model, out["sequences"], out["attention_mask"], batch["input_ids"].shape[1], temperature=T
    )
    assert mask.sum() > 20
    torch.testing.assert_close(out["sampler_logprobs"][mask], dense[mask], atol=1e-4, rtol=0)


def test_dense_rollouts_bring_the_policy_pass_from_their_sampling_logits(policy):
    """`policy_scores=True` (`ppo.reuse_rollout_logprobs`): the dense sampler returns what the policy's
    scoring pass (`policy_scores`) would compute on its rollouts, so PPO skips that pass: log-probs at
    T = 1 and the sampling distribution's entropy, zero past each response. A pruned sampler's
    logits are not the policy's: it returns none, and the policy scores its rollouts."""
    from rto.ppo.losses import policy_scores

    batch = prompt_batch(policy["path"])
    rollout = worker(policy, "dense", max_new_tokens=10, temperature=T, top_p=TOP_P)
    favour(rollout.model, rollout.eos_token_ids, bonus=2.0)  # some responses end early: padding after them
    torch.manual_seed(0)
    out = rollout.generate(batch, policy_scores=True)
    torch.manual_seed(0)
    assert torch.equal(rollout.generate(batch)["sequences"], out["sequences"])  # the same sampling
    mask = out["response_mask"].bool()
    full = policy_scores(
        rollout.model, out["sequences"], out["attention_mask"], batch["input_ids"].shape[1], temperature=T
    )
    assert mask.sum() > 20 and not mask.all()
    for mine, theirs in (("policy_logprobs", "logprobs"), ("sampler_logprobs", "sampling_logprobs"),
                         ("policy_entropy", "entropy")):  # fmt: skip
        torch.testing.assert_close(out[mine], full[theirs], atol=1e-4, rtol=0)
        assert bool((out[mine][~mask] == 0).all())
    assert not torch.allclose(out["policy_logprobs"][mask], out["sampler_logprobs"][mask])  # T != 1
    pruned = worker(policy, "ftp", max_new_tokens=10, temperature=T, top_p=TOP_P).generate(
        batch, policy_scores=True
    )
    assert "policy_logprobs" not in pruned and "policy_entropy" not in pruned


@pytest.mark.parametrize("sampler", ["dense", "ftp"])
def test_text_samplers_never_emit_pad_or_special_tokens(policy, sampler):
    rollout = worker(policy, sampler, max_new_tokens=12, temperature=1.0)
    tokens = model_sampling_token_ids(policy["path"])
    forbidden = tokens["suppress_token_ids"]
    tokenizer = load_tokenizer(policy["path"])
    assert tokenizer.pad_token_id in forbidden and tokenizer.bos_token_id in forbidden
    assert tokenizer.convert_tokens_to_ids("<|end_of_text|>") in forbidden  # an end token, not the EOS
    assert tokens["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|eot_id|>") not in forbidden
    hook = favour(rollout.model, forbidden)
    try:
        torch.manual_seed(0)
        out = rollout.generate(prompt_batch(policy["path"], n=16))
    finally:
        hook.remove()
    emitted = out["sequences"][:, -12:][out["response_mask"].bool()]
    assert emitted.numel() > 100
    assert not torch.isin(emitted, torch.tensor(forbidden)).any()
    assert bool(torch.isfinite(out["sampler_logprobs"]).all())


def test_eval_and_score_sampling_never_emit_special_tokens(policy):
    """`rto.generation.sample` (the eval stage and `rto score`) suppresses the same tokens."""
    from rto.models import load_model, sampling_token_ids

    tokenizer = load_tokenizer(policy["path"])
    model = load_model(policy["path"]).eval()
    never = sampling_token_ids(tokenizer, model.config.vocab_size)["suppress_token_ids"]
    hook = favour(model, never)
    try:
        torch.manual_seed(0)
        ids = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS * 4]
        samples = sample(
            model, ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, max_new_tokens=12,
            temperature=0.7, suppress_token_ids=never,
        )  # fmt: skip
    finally:
        hook.remove()
    emitted = samples.responses[samples.response_mask.bool()]
    assert emitted.numel() > 100 and not torch.isin(emitted, torch.tensor(never)).any()


@pytest.mark.parametrize("sampler", ["dense", "ftp"])
def test_rollouts_ignore_the_models_own_generation_defaults(policy, tmp_path, sampler):
    """Qwen and Llama-3 ship generation configs with a repetition penalty, top-k, top-p, a minimum
    length: rollouts must be samples of exactly the configured distribution, or the sampler
    log-probs (computed from the raw logits, as PPO's are) describe another one. HF generate fills
    every setting left unset from the model's generation config, so each shipped setting here
    would show: top-k 1 makes two answers to one prompt identical, the minimum length forbids the
    EOS the hook makes likely, the penalty forbids repeating the favoured word. FTP's sampler
    refused such a checkpoint outright (no repetition penalty in its decoding loop)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy["path"])
    shipped = dict(repetition_penalty=50.0, min_new_tokens=12, top_k=1, top_p=0.05, no_repeat_ngram_size=1)
    for name, value in shipped.items():
        setattr(model.generation_config, name, value)
    model.save_pretrained(tmp_path / "policy")
    AutoTokenizer.from_pretrained(policy["path"]).save_pretrained(tmp_path / "policy")
    rollout = worker(
        {**policy, "path": str(tmp_path / "policy")}, sampler, max_new_tokens=12, temperature=1.0
    )
    tokenizer = load_tokenizer(policy["path"])
    word = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" cat")[0])
    favour(rollout.model, [word], bonus=6.0)
    favour(rollout.model, rollout.eos_token_ids, bonus=5.5)
    batch = prompt_batch(policy["path"], n=16)  # rows i and i + 4 ask the same question
    torch.manual_seed(0)
    out = rollout.generate(batch)
    mask = out["response_mask"].bool()
    dense = response_logprobs(
        rollout.model, out["sequences"], out["attention_mask"], batch["input_ids"].shape[1]
    )
    torch.testing.assert_close(out["sampler_logprobs"][mask], dense[mask], atol=1e-4, rtol=0)
    responses = out["sequences"][:, batch["input_ids"].shape[1] :]
    assert (mask.sum(1) < 12).sum() >= 8  # EOS within the minimum length
    assert ((responses == word) & mask.bool()).sum(1).max() >= 2  # the favoured word again
    assert not torch.equal(responses[:4], responses[4:8])  # top-k 1 would answer alike


def test_dense_rollouts_are_not_truncated_to_the_top_50_tokens(policy):
    """`top_k: 0` means no top-k truncation. HF generate's own default is top-k 50 wherever the
    setting is left unset, which a 128 k-token vocabulary would sample from without a word."""
    rollout = worker(policy, "dense", max_new_tokens=12, temperature=1.0)
    torch.nn.init.zeros_(rollout.model.lm_head.weight)  # logits 0: the ramp alone orders the tokens
    ramp = torch.linspace(0, 0.5, rollout.model.config.vocab_size)

    def hook(_module, _inputs, logits):
        return logits + ramp  # a strict order: top-k would keep only the last k token ids

    rollout.model.lm_head.register_forward_hook(hook)
    batch = prompt_batch(policy["path"], n=16)
    torch.manual_seed(0)
    out = rollout.generate(batch)
    emitted = out["sequences"][:, batch["input_ids"].shape[1] :][out["response_mask"].bool()]
    allowed = torch.tensor(
        [t for t in range(rollout.model.config.vocab_size) if t not in rollout.suppress_token_ids]
    )
    rank = (allowed.unsqueeze(0) > emitted.unsqueeze(1)).sum(1)  # among samplable tokens; 0: the likeliest
    assert emitted.numel() > 150 and int(rank.max()) >= 80


def test_kv_cache_kind_is_static_for_text_on_the_cpu_only():
    from rto.generation import kv_cache_kind

    assert kv_cache_kind("auto", "cpu") == "static"
    assert kv_cache_kind("auto", "cpu", vision=True) == "dynamic"
    assert kv_cache_kind("auto", "cuda") == kv_cache_kind("dynamic", "cpu") == "dynamic"
    assert kv_cache_kind("static", "cuda", vision=True) == "static"
    with pytest.raises(ValueError, match="'paged'"):
        kv_cache_kind("paged", "cpu")
    with pytest.raises(ValueError, match="'paged'"):
        RolloutWorker(model=torch.nn.Linear(1, 1), eos_token_id=0, generation_cache="paged")


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral", "gpt2"])
def test_static_and_dynamic_kv_caches_sample_the_same_rollouts(tmp_path, family):
    """`ppo.generation_cache`: the static cache (written in place, the default for text on the CPU)
    and the dynamic one (grown by concatenation) decode the same tokens with the same log-probs;
    the decoding really runs with the cache asked for."""
    from transformers import DynamicCache, StaticCache

    path = str(save_family_model(family, tmp_path / family))
    tokenizer = load_tokenizer(path)
    ids = [encode_prompt(tokenizer, QUESTIONS[i % 4] * (1 + i % 3)) for i in range(8)]  # GPT-2: no chat
    input_ids, mask = left_pad(ids, tokenizer.pad_token_id)  # prompts of three lengths: left padding
    batch = {"input_ids": input_ids, "attention_mask": mask}
    outs, used = {}, {}
    for cache in ("dynamic", "static", "auto"):
        rollout = RolloutWorker(path, max_new_tokens=12, temperature=T, top_p=TOP_P, generation_cache=cache)
        seen: set[type] = set()

        def spy(_module, _args, kwargs, seen=seen):
            seen.add(type(kwargs.get("cache", kwargs.get("past_key_values"))))

        rollout.model.register_forward_pre_hook(spy, with_kwargs=True)
        torch.manual_seed(0)
        outs[cache] = rollout.generate(batch, policy_scores=True)
        used[cache] = seen
    assert used == {"dynamic": {DynamicCache}, "static": {StaticCache}, "auto": {StaticCache}}
    dynamic, static = outs["dynamic"], outs["static"]
    assert dynamic["response_mask"].sum() > 20
    for name in ("sequences", "attention_mask", "response_mask"):
        assert torch.equal(static[name], dynamic[name]), name
    for name in ("sampler_logprobs", "policy_logprobs", "policy_entropy"):
        torch.testing.assert_close(static[name], dynamic[name], atol=1e-5, rtol=0)
