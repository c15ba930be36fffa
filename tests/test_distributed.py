"""The distributed layer through real Ray actors and real DeepSpeed engines (ZeRO-2, gloo, 2 ranks).

Functions sent to workers: Ray pickles module-level functions by reference, and the workers cannot
import a test file, so this module is registered to be pickled by value.
"""

from __future__ import annotations

import json
import sys

import pytest
import ray
import torch
import transformers

from rto.distributed import (
    ActorGroup,
    EngineConfig,
    FrozenModelWorker,
    Resources,
    RolloutWorker,
    TrainableWorker,
    concat_results,
    create_placement_group,
    init_ray,
    push_weights,
    split_batch,
)

VOCAB, EOS, PAD = 48, 1, 0


def make_tiny_llama(directory) -> str:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def prompts(batch_size: int = 4, prompt_len: int = 6) -> dict[str, torch.Tensor]:
    """Left-padded prompts of different lengths."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch_size, prompt_len), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch_size):
        pad = row % 3
        ids[row, :pad], mask[row, :pad] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    init_ray(num_cpus=2)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pg = create_placement_group(2, {"CPU": 1})  # everything colocated on 2 bundles of 1 CPU
    share = Resources(num_cpus=0.4)  # leaves 0.2 of each bundle for the ZeRO-3 group of one test
    policy = ActorGroup(
        TrainableWorker,
        2,
        placement_group=pg,
        resources=share,
        name="policy",
        worker_kwargs=dict(model_path=model_dir, config=EngineConfig(zero_stage=2, lr=1e-2)),
    )
    rollout = ActorGroup(
        RolloutWorker,
        1,
        placement_group=pg,
        resources=share,
        name="rollout",
        worker_kwargs=dict(model_path=model_dir, max_new_tokens=8, temperature=1.0, seed=3),
    )
    ref = ActorGroup(
        FrozenModelWorker,
        1,
        placement_group=pg,
        resources=share,
        bundle_offset=1,
        name="ref",
        worker_kwargs=dict(model_path=model_dir),
    )
    yield {"policy": policy, "rollout": rollout, "ref": ref, "model_dir": model_dir, "pg": pg}
    for group in (policy, rollout, ref):
        group.shutdown()
    ray.util.remove_placement_group(pg)
    ray.shutdown()


def lm_loss(model, sequences, attention_mask, **_):
    return model(input_ids=sequences, attention_mask=attention_mask, labels=sequences).loss


def test_split_and_concat_in_batch_order():
    batch = {"x": torch.arange(5), "y": torch.arange(10).view(5, 2), "prompt_len": 3}
    shards = split_batch(batch, 2)
    assert [s["x"].tolist() for s in shards] == [[0, 1, 2], [3, 4]]
    assert all(s["prompt_len"] == 3 for s in shards)
    assert len(split_batch(batch, 8)) == 5  # never an empty shard
    assert torch.equal(concat_results([s["y"] for s in shards]), batch["y"])
    assert concat_results([{"a": 1}, {"a": 2}]) == [{"a": 1}, {"a": 2}]


def test_frozen_worker_without_ray(tmp_path):
    model_dir = make_tiny_llama(tmp_path)
    worker = FrozenModelWorker(
        model_dir, scoring_fn=lambda model, input_ids: model(input_ids=input_ids).logits
    )
    logits = worker.score({"input_ids": torch.tensor([[3, 4, 5]])})
    assert logits.shape == (1, 3, VOCAB)


def test_critic_loaded_from_reward_model_starts_as_its_score(tmp_path):
    from rto.forward import sequence_scores
    from rto.models import load_model

    config = transformers.AutoConfig.from_pretrained(make_tiny_llama(tmp_path / "lm"))
    config.num_labels = 1
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    critic = load_model(str(tmp_path / "rm"), "token_classification")
    reward_model = load_model(str(tmp_path / "rm"), "sequence_classification")
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = critic(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # [B, L]
        torch.testing.assert_close(values[:, -1], sequence_scores(reward_model, ids, mask))


def test_worker_loader_errors_name_the_folder_and_field(tmp_path):
    from rto.errors import UserError
    from rto.models import load_model

    with pytest.raises(UserError, match="model folder '.*missing' does not exist") as error:
        load_model(str(tmp_path / "missing"), "causal_lm", field="reference.path")
    assert error.value.field == "reference.path"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot read the model config of '.*empty'"):
        load_model(str(tmp_path / "empty"), "sequence_classification", field="reward.path")
    config_only = tmp_path / "config-only"
    transformers.AutoConfig.from_pretrained(make_tiny_llama(tmp_path / "lm")).save_pretrained(config_only)
    for kind, what in [("sequence_classification", "a reward model"), ("token_classification", "a critic")]:
        with pytest.raises(UserError, match=f"cannot load {what} from '.*config-only'"):
            load_model(str(config_only), kind, field="reward.path")
    with pytest.raises(ValueError, match="model kind must be one of"):
        load_model(str(tmp_path / "lm"), "value_head")


def test_generate_layout_and_sampler_logprobs(groups):
    batch = prompts()
    out = groups["rollout"].run_sharded("generate", batch)
    sequences, response_mask, logprobs = out["sequences"], out["response_mask"], out["sampler_logprobs"]
    prompt_len, response_len = batch["input_ids"].shape[1], 8
    assert sequences.shape == (4, prompt_len + response_len)
    assert torch.equal(sequences[:, :prompt_len], batch["input_ids"])
    assert torch.equal(out["attention_mask"], torch.cat([batch["attention_mask"], response_mask], 1))
    assert logprobs.shape == response_mask.shape == (4, response_len)
    assert (logprobs[response_mask.bool()] < 0).all() and (logprobs[~response_mask.bool()] == 0).all()
    # masks are "1 then 0" and stop at the first EOS
    assert (response_mask[:, 1:] <= response_mask[:, :-1]).all()
    response = sequences[:, prompt_len:]
    for row in range(4):
        eos = (response[row] == EOS).nonzero()
        expected = int(eos[0]) + 1 if len(eos) else response_len
        assert int(response_mask[row].sum()) == expected

    # temperature 1, no truncation: the sampler's log-probs are the dense model's (here a frozen
    # copy scored with reward.scoring, imported lazily inside the worker) up to float error
    ref_logprobs = groups["ref"].run_sharded(
        "score", out, fn="rto.forward:response_logprobs", prompt_len=prompt_len, micro_batch_size=2
    )
    torch.testing.assert_close(ref_logprobs, logprobs, atol=1e-4, rtol=1e-4)


def test_run_sharded_order_across_ranks_and_concurrent_groups(groups):
    def rank_and_rows(model, x):
        return {"x": x, "rank": torch.full_like(x, torch.distributed.get_rank())}

    batch = {"x": torch.arange(5)}
    refs_policy = groups["policy"].async_run_sharded("score", batch, fn=rank_and_rows)
    refs_ref = groups["ref"].async_run_sharded("score", {"x": torch.arange(3)}, fn=lambda model, x: x * 2)
    out = concat_results(ray.get(refs_policy))
    assert out["x"].tolist() == [0, 1, 2, 3, 4] and out["rank"].tolist() == [0, 0, 0, 1, 1]
    assert concat_results(ray.get(refs_ref)).tolist() == [0, 2, 4]


def test_train_step_then_push_weights_to_rollout(groups):
    policy, rollout = groups["policy"], groups["rollout"]
    before = rollout.run_all("weights_checksum")[0]
    assert policy.run_all("weights_checksum") == [before, before]
    samples = rollout.run_sharded("generate", prompts())
    metrics = policy.run_sharded("train_step", samples, loss_fn=lm_loss)
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)
    rank0, rank1 = policy.run_all("weights_checksum")
    assert rank0 == rank1 != before  # ZeRO-2 kept the two replicas identical after the step
    push_weights(policy, rollout)
    assert rollout.run_all("weights_checksum") == [rank0]
    # the rollout worker actually generates with the new weights
    assert rollout.run_sharded("generate", prompts())["sequences"].shape[0] == 4


def test_checkpoint_round_trip_restores_weights_and_optimizer(groups, tmp_path):
    policy = groups["policy"]
    samples = {
        "sequences": torch.randint(3, VOCAB, (4, 10)),
        "attention_mask": torch.ones(4, 10, dtype=torch.long),
    }
    policy.run_sharded("train_step", samples, loss_fn=lm_loss)
    saved_weights = policy.run_all("weights_checksum")[0]
    saved_state = policy.run_all("training_state")[0]
    policy.run_all("save_checkpoint", str(tmp_path), "step-a", client_state={"ppo_step": 7})
    policy.run_sharded("train_step", samples, loss_fn=lm_loss)
    moved = policy.run_all("training_state")[0]
    assert moved["optimizer_step"] == saved_state["optimizer_step"] + 1
    assert policy.run_all("weights_checksum")[0] != saved_weights
    client_states = policy.run_all("load_checkpoint", str(tmp_path), "step-a")
    assert client_states[0]["ppo_step"] == 7
    assert policy.run_all("weights_checksum") == [saved_weights, saved_weights]
    assert policy.run_all("training_state") == [saved_state, saved_state]
    policy.run_all("save_hf", str(tmp_path / "hf"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    from rto.distributed import weights_checksum

    assert weights_checksum(reloaded) == saved_weights


def _lm_head_widths(worker, sequences, attention_mask, prompt_len):
    """Run inside a policy rank: the sequence width of the logits the training forward builds."""
    from rto.forward import response_logprobs

    widths = []
    hook = worker.model.lm_head.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    try:
        response_logprobs(worker.engine, sequences, attention_mask, prompt_len)
    finally:
        hook.remove()
    return widths


def test_training_forward_builds_logits_only_for_the_response(groups):
    """Through the DeepSpeed engine (whose forward is `*inputs, **kwargs`), `logits_to_keep`
    still reaches the model: R + 1 positions, not the whole prompt + response."""
    batch = prompts()
    response = torch.randint(3, VOCAB, (4, 5))
    sequences = torch.cat([batch["input_ids"], response], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(response)], dim=1)
    widths = groups["policy"].run_all("call", _lm_head_widths, sequences, mask, batch["input_ids"].shape[1])
    assert widths == [[6], [6]]


def test_zero3_group_scores_an_uneven_batch_in_bounded_time(groups):
    """ZeRO-3 gathers parameters inside every forward, so all ranks must make the same calls: a
    batch of 5 rows over 2 ranks (3 + 2, micro-batches of 2: two forwards against one) would hang.
    `async_run_even` pads the shards to equal size and drops the padding from the result."""
    z3 = ActorGroup(
        TrainableWorker,
        2,
        placement_group=groups["pg"],
        resources=Resources(num_cpus=0.1),
        name="zero3",
        worker_kwargs=dict(model_path=groups["model_dir"], config=EngineConfig(zero_stage=3)),
    )
    try:
        batch = prompts(batch_size=5)
        response = torch.randint(3, VOCAB, (5, 4))
        scored = {
            "sequences": torch.cat([batch["input_ids"], response], dim=1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(response)], dim=1),
        }
        prompt_len = batch["input_ids"].shape[1]
        pending = z3.async_run_even(
            "score", scored, fn="rto.forward:response_logprobs", prompt_len=prompt_len, micro_batch_size=2
        )
        ready, _ = ray.wait(pending.refs, num_returns=len(pending.refs), timeout=120)
        assert len(ready) == 2, "the ZeRO-3 ranks did not finish: unequal forward calls"
        expected = groups["ref"].run_sharded(
            "score", scored, fn="rto.forward:response_logprobs", prompt_len=prompt_len
        )
        torch.testing.assert_close(pending.get(), expected, atol=1e-5, rtol=0)
    finally:
        z3.shutdown()


class _Payload:
    """Unpickling this runs `touch <marker>`: what a run directory from elsewhere could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(groups, tmp_path):
    """DeepSpeed's own loader unpickles anything; ours reads every file with weights_only=True."""
    from rto.errors import UserError
    from rto.ppo import checkpoint

    policy = groups["policy"]
    policy.run_all("save_checkpoint", str(tmp_path / "policy"), checkpoint.TAG, client_state={"ppo_step": 1})
    marker = tmp_path / "pwned"
    (optim,) = list((tmp_path / "policy" / checkpoint.TAG).glob("zero_pp_rank_0_*optim_states.pt"))
    torch.save({"optimizer_state_dict": _Payload(marker)}, optim)

    class PolicyOnly:  # checkpoint.load loads every trainable group; here the policy alone
        def trainable(self):
            return [policy]

    (tmp_path / "state.json").write_text(json.dumps({"step": 1, "rng": checkpoint.rng_state()}))
    with pytest.raises(UserError, match="refusing to load a checkpoint file") as error:
        checkpoint.load(tmp_path, PolicyOnly())
    assert "posix" in str(error.value) and "\n" not in str(error.value)  # the global it would call
    assert not marker.exists()


def test_checkpoint_rng_state_is_plain_json_and_checked(tmp_path):
    import random

    from rto.errors import UserError
    from rto.ppo import checkpoint

    state = checkpoint.rng_state()
    text = json.dumps(state)  # nothing but JSON values
    expected = (random.random(), torch.rand(1).item())
    checkpoint.restore_rng(json.loads(text))
    assert (random.random(), torch.rand(1).item()) == expected
    for broken in ({**state, "python": [3, [1, 2], None]}, {**state, "torch": "not base64!"}, {"numpy": 1}):
        with pytest.raises(UserError, match="unreadable RNG state"):
            checkpoint.restore_rng(broken, "state.json")
