"""AdaptInfer engine: exactness against the dense model, the documented score, batching."""

from __future__ import annotations

import pytest
import torch

from pipelines.tasks import image as task
from pipelines.tasks import image_model
from prune.adaptinfer import decode, generate_pruned, prefill, text_prior_weights, vlm_token_logprobs
from prune.flops import dense_prefill_flops, prefill_flops_per_layer
from rto.errors import UserError

N_VISION = task.N_VISION_TOKENS


@pytest.fixture(scope="module")
def tiny():
    return image_model.tiny_random_vlm(seed=0, n_layers=4)


@pytest.fixture(scope="module")
def batch(tiny):
    _, processor = tiny
    examples = task.make_examples(4, seed=7)  # question lengths differ -> left padding
    inputs = task.encode(processor, examples)
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) > 1
    return inputs


def position_ids(inputs):
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)


def test_empty_and_keep_all_schedules_equal_the_dense_model_exactly(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        hf_logits = model(**batch, position_ids=position_ids(batch)).logits[:, -1]
        hf_sequences = model.generate(**batch, max_new_tokens=5, do_sample=False)
        for schedule in ({}, {0: N_VISION, 2: N_VISION}):
            logits, _, trace = prefill(
                model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], schedule
            )
            assert torch.equal(logits, hf_logits)
            out = generate_pruned(model, batch, schedule, max_new_tokens=5)
            assert torch.equal(out.sequences, hf_sequences)
            assert trace.vision_per_layer == [N_VISION] * 4


def test_decode_logits_match_a_dense_forward_on_the_generated_text(tiny, batch):
    model, _ = tiny
    out = generate_pruned(model, batch, {}, max_new_tokens=4)
    mask = torch.cat([batch["attention_mask"], out.response_mask], dim=1)
    with torch.no_grad():
        dense = vlm_token_logprobs(model, out.sequences, batch["pixel_values"], mask)
    prompt = batch["input_ids"].shape[1]
    response = dense[:, prompt - 1 :]
    torch.testing.assert_close(response * out.response_mask, out.sampler_logprobs, atol=1e-5, rtol=1e-5)


def reference_adaptinfer_scores(attn: torch.Tensor, text: list[int], vision: list[int]) -> torch.Tensor:
    """The paper's score with explicit loops: attn (H, N, N) of one sample at the pruning layer."""
    heads = attn.shape[0]
    scores = torch.zeros(len(vision), dtype=torch.float64)
    for h in range(heads):
        a = attn[h].double()
        prior = {(i, j): a[i, j] + a[j, i] - (a[i, i] if i == j else 0.0) for i in text for j in text}
        weight = {j: sum(prior[(i, j)] for i in text) for j in text}
        for column, v in enumerate(vision):
            scores[column] += sum(weight[i] * a[i, v] for i in text)
    return scores


@pytest.mark.parametrize("k", [20, 5])
def test_kept_tokens_are_the_top_k_of_the_documented_score(tiny, batch, k):
    model, _ = tiny
    layer = 1
    _, _, trace = prefill(
        model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], {layer: k}
    )
    eager, _ = image_model.tiny_random_vlm(seed=0, n_layers=4, attn_implementation="eager")
    with torch.no_grad():
        attentions = eager(**batch, position_ids=position_ids(batch), output_attentions=True).attentions
    for b in range(batch["input_ids"].shape[0]):
        ids, valid = batch["input_ids"][b], batch["attention_mask"][b].bool()
        vision = [i for i in range(len(ids)) if ids[i] == model.config.image_token_id]
        text = [i for i in range(vision[-1] + 1, len(ids)) if valid[i]]
        scores = reference_adaptinfer_scores(attentions[layer][b], text, vision)
        expected = set(scores.topk(k).indices.tolist())
        assert set(trace.kept_vision[layer][b].tolist()) == expected


def test_text_prior_by_hand():
    a = torch.tensor([[[[0.5, 0.0], [0.25, 0.75]]]])  # (1, 1, 2, 2) text-to-text attention
    # S = A + Aᵀ − diag(A) = [[0.5, 0.25], [0.25, 0.75]]; w_j = Σ_i S_ij = [0.75, 1.0]
    w = text_prior_weights(a, torch.tensor([[True, True]]))
    torch.testing.assert_close(w, torch.tensor([[[0.75, 1.0]]]))
    w = text_prior_weights(a, torch.tensor([[True, False]]))  # padding row/column ignored
    torch.testing.assert_close(w, torch.tensor([[[0.5, 0.0]]]))


@pytest.mark.parametrize("method", ["adaptinfer", "adaptinfer_no_prior", "fastv"])
def test_batched_results_equal_per_sample_results(tiny, method):
    model, processor = tiny
    examples = task.make_examples(3, seed=11)
    schedule = {0: 32, 2: 8}
    inputs = task.encode(processor, examples)
    together = generate_pruned(model, inputs, schedule, method, max_new_tokens=4)
    prompt = inputs["input_ids"].shape[1]
    for b, example in enumerate(examples):
        one = task.encode(processor, [example])
        alone = generate_pruned(model, one, schedule, method, max_new_tokens=4)
        new = alone.sequences.shape[1] - one["input_ids"].shape[1]
        assert torch.equal(alone.sequences[0, -new:], together.sequences[b, prompt : prompt + new])
        assert (together.response_mask[b, new:] == 0).all()
        for layer in schedule:
            assert torch.equal(alone.trace.kept_vision[layer][0], together.trace.kept_vision[layer][b])
        torch.testing.assert_close(
            alone.sampler_logprobs[0], together.sampler_logprobs[b, :new], atol=1e-5, rtol=1e-5
        )


def test_tokens_leave_the_sequence_and_the_cache(tiny, batch):
    model, _ = tiny
    out = generate_pruned(model, batch, {0: 16, 2: 4}, max_new_tokens=2)
    n = batch["input_ids"].shape[1]
    assert out.trace.vision_per_layer == [N_VISION, 16, 16, 4]
    assert out.trace.tokens_per_layer == [n, n - 48, n - 48, n - 60]
    _, state, _ = prefill(
        model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], {0: 16, 2: 4}
    )
    assert [layer.keys.shape[-2] for layer in state.cache.layers] == [n, n - 48, n - 48, n - 60]


def test_sampling_is_seeded_and_logprobs_are_of_the_chosen_tokens(tiny, batch):
    model, _ = tiny
    runs = [
        generate_pruned(
            model,
            batch,
            {1: 8},
            max_new_tokens=3,
            do_sample=True,
            top_k=5,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert (runs[0].sampler_logprobs <= 0).all()


def test_flops_of_an_unpruned_trace_equal_the_dense_prefill(tiny, batch):
    model, _ = tiny
    _, _, trace = prefill(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], {})
    n = batch["input_ids"].shape[1]
    assert sum(prefill_flops_per_layer(model.config, trace.tokens_per_layer)) == dense_prefill_flops(
        model.config, n
    )


def test_attention_profile_and_inflection_layers(tiny, batch):
    from prune.adaptinfer.analysis import inflection_layers, text_to_vision_profile

    model, _ = tiny
    profile = text_to_vision_profile(model, [batch])
    assert len(profile) == 4 and all(0.0 <= share <= 1.0 for share in profile)
    assert inflection_layers([0.9, 0.5, 0.45, 0.1, 0.05], n_cuts=2) == [0, 2]


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_decode_continues_the_pruned_prefill(tiny, batch, positions):
    """One decode step equals a pruned prefill of the prompt plus that token (same kept tokens: the
    seeded random scorer draws the same scores), under either position-id convention."""
    model, _ = tiny
    schedule = {0: 20, 2: 5}
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    with torch.no_grad():
        logits, state, trace = prefill(
            model,
            ids,
            pixels,
            mask,
            schedule,
            "random",
            torch.Generator().manual_seed(3),
            positions=positions,
        )
        token = logits.argmax(-1)
        step = decode(model, token, state)
        longer = torch.cat([ids, token[:, None]], dim=1)
        again, _, trace2 = prefill(
            model,
            longer,
            pixels,
            torch.cat([mask, torch.ones_like(token)[:, None]], dim=1),
            schedule,
            "random",
            torch.Generator().manual_seed(3),
            positions=positions,
        )
    for layer in schedule:
        assert torch.equal(trace.kept_vision[layer], trace2.kept_vision[layer])
    torch.testing.assert_close(step, again, atol=1e-5, rtol=1e-5)


def test_contiguous_positions_renumber_the_kept_tokens(tiny, batch):
    """Keep-all: both conventions are the dense model; with a cut they differ (the text moves)."""
    model, _ = tiny
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    with torch.no_grad():
        dense, _, _ = prefill(model, ids, pixels, mask, {1: N_VISION}, positions="contiguous")
        reference, _, _ = prefill(model, ids, pixels, mask, {})
        assert torch.equal(dense, reference)
        original, state_o, _ = prefill(model, ids, pixels, mask, {1: 8})
        renumbered, state_c, _ = prefill(model, ids, pixels, mask, {1: 8}, positions="contiguous")
    assert not torch.allclose(original, renumbered)
    assert state_o.layer_next_position is None
    before, after = state_c.layer_next_position[1], state_c.layer_next_position[2]
    assert torch.equal(before - after, torch.full_like(before, N_VISION - 8))
    with pytest.raises(UserError):
        prefill(model, ids, pixels, mask, {}, positions="shifted")
