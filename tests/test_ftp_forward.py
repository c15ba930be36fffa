"""FTP token-skipping forward and pruned generation on tiny random Llama / Qwen2 / Mistral models."""

import pytest
import torch

from prune.ftp.forward import achieved_sparsity, skipping_forward
from prune.ftp.generate import generate_pruned
from prune.ftp.models import random_causal_lm
from prune.ftp.router import Router

ARCHS = ["llama", "qwen2", "mistral"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(threads)


def left_padded_batch(vocab: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 14), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    attention_mask[2, :7] = 0
    return input_ids, attention_mask


class ReplayRouter(Router):
    """A router that makes given decisions: the k-th routed block keeps exactly `keeps[k]`."""

    def __init__(self, keeps: list[torch.Tensor]):
        super().__init__()
        self.keeps, self.calls = keeps, 0

    def forward(self, factors: torch.Tensor) -> torch.Tensor:
        keep = self.keeps[self.calls]
        self.calls += 1
        return torch.where(keep, 20.0, -20.0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_sparsity_reproduces_dense_logits(arch, impl):
    model = random_causal_lm(arch, attn_implementation=impl)
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        dense = model(input_ids=input_ids, attention_mask=attention_mask).logits
        ours = skipping_forward(model, input_ids, attention_mask, schedule=[0.0] * 4).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(ours[valid], dense[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_sparsity_greedy_matches_generate(arch):
    model = random_causal_lm(arch)
    input_ids, attention_mask = left_padded_batch(seed=1)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = model.generate(input_ids, attention_mask=attention_mask, **settings)
    ours = generate_pruned(model, Router(), [0.0] * 4, input_ids, attention_mask, **settings)
    assert torch.equal(ours, expected)


def test_skipped_tokens_pass_through_unchanged_and_write_no_keys():
    model = random_causal_lm("llama")
    input_ids = torch.randint(3, 128, (2, 12))
    attention_mask = torch.ones_like(input_ids)  # no padding: blocks 0 and 2 see tokens in sequence order
    seen = {}
    model.model.layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("after0", out.clone()))
    model.model.layers[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("before2", a[0].clone()))
    with torch.no_grad():
        out = skipping_forward(
            model, input_ids, attention_mask, schedule=[0.0, 0.5, 0.0, 0.0], router="static"
        )
    skipped = attention_mask.bool() & ~out.routes[1].keep
    assert skipped.sum() > 0
    assert torch.equal(seen["before2"][skipped], seen["after0"][skipped])
    kept = out.routes[1].keep
    assert not torch.equal(seen["before2"][kept], seen["after0"][kept])
    assert out.cache.kv_tokens() == [
        int(attention_mask.sum()),
        int(kept.sum()),
        int(attention_mask.sum()),
    ] + [int(attention_mask.sum())]


@pytest.mark.parametrize("router", ["static", "random", "learned"])
def test_achieved_sparsity_matches_schedule(router):
    model = random_causal_lm("qwen2")
    input_ids, attention_mask = left_padded_batch()
    schedule = [0.0, 0.25, 0.5, 0.75]
    scorer = Router() if router == "learned" else router
    with torch.no_grad():
        out = skipping_forward(model, input_ids, attention_mask, schedule=schedule, router=scorer)
    n_valid = attention_mask.sum(1)
    for route, target in zip(out.routes, schedule, strict=True):
        per_row = 1 - route.keep.sum(1) / n_valid
        assert (per_row - target).abs().max() <= 0.5 / n_valid.min() + 1e-6
        assert bool((route.keep <= attention_mask.bool()).all())  # padding is never computed
    assert achieved_sparsity(out.routes)[0] == 0.0


def test_static_router_keeps_first_and_latest_tokens():
    model = random_causal_lm("llama")
    input_ids = torch.arange(3, 13)[None]
    with torch.no_grad():
        out = skipping_forward(model, input_ids, schedule=[0.5] * 4, router="static")
    assert out.routes[0].keep[0].tolist() == [True] + [False] * 5 + [True] * 4


def test_decode_threshold_rule_skips_blocks_and_their_keys():
    model = random_causal_lm("mistral")
    router = Router()
    with torch.no_grad():
        router.mlp[2].bias.copy_(torch.tensor([10.0, -10.0]))  # p(keep) ~ 0 for every token
    input_ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        prefill = skipping_forward(model, input_ids, schedule=[0.0, 0.3, 0.3, 0.0], router=router)
        before = prefill.cache.kv_tokens()
        step = skipping_forward(
            model,
            input_ids[:, :1],
            torch.ones(2, 10, dtype=torch.long),
            schedule=[0.0, 0.3, 0.3, 0.0],
            router=router,
            cache=prefill.cache,
        )
    after = step.cache.kv_tokens()
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 0, 0, 2]
    assert [bool(r.keep.any()) for r in step.routes] == [True, False, False, True]


def test_pruned_sampling_runs_with_eos_and_padding():
    model = random_causal_lm("llama")
    input_ids, attention_mask = left_padded_batch()
    gen = torch.Generator().manual_seed(0)
    out = generate_pruned(
        model,
        "static",
        [0.0, 0.4, 0.4, 0.4],
        input_ids,
        attention_mask,
        max_new_tokens=6,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        eos_token_id=5,
        pad_token_id=0,
        generator=gen,
    )
    assert out.shape[0] == 3 and 14 < out.shape[1] <= 20
    assert torch.equal(out[:, :14], input_ids)
    with pytest.raises(TypeError, match="not_an_option"):
        generate_pruned(model, "static", [0.0] * 4, input_ids, attention_mask, not_an_option=1)


def test_a_row_that_skips_a_block_keeps_its_attention_table():
    """Decoding, one row's new token computes block 1 and the other's skips it: the skipping row
    gets no fresh attention there, so the factors block 2 routes it on are what they would be with
    the row alone (its table is not zeroed)."""
    model = random_causal_lm("llama")
    ids, mask = left_padded_batch()
    schedule, router = [0.0, 0.5, 0.5, 0.0], Router()

    def decode(rows: slice, block1: list[bool]):
        prefill = skipping_forward(model, ids[rows], mask[rows], schedule=schedule, router=router)
        step_mask = torch.cat([mask[rows], mask.new_ones(len(block1), 1)], dim=1)
        keeps = [torch.tensor(block1)[:, None], torch.ones(len(block1), 1, dtype=torch.bool)]
        out = skipping_forward(
            model,
            ids[rows, -1:],
            step_mask,
            schedule=schedule,
            router=ReplayRouter(keeps),
            cache=prefill.cache,
        )
        assert out.routes[1].keep[:, 0].tolist() == block1
        return out

    with torch.no_grad():
        both, alone = decode(slice(0, 2), [True, False]), decode(slice(1, 2), [False])
    for name in ("attn_score", "attn_rank"):
        assert torch.allclose(getattr(both.routes[2].state, name)[1], getattr(alone.routes[2].state, name)[0])
    assert torch.allclose(both.logits[1], alone.logits[0], atol=1e-4)


def test_dense_decoding_skips_the_router_without_changing_anything():
    """With every decode threshold 0, a decoded token computes every block: the decode step then
    neither scores nor probes, and gives exactly what the routed path gives."""
    model = random_causal_lm("llama")
    ids, mask = left_padded_batch()
    schedule, router = [0.0, 0.5, 0.3, 0.4], Router()
    outs = []
    for route in (False, True):
        with torch.no_grad():
            prefill = skipping_forward(model, ids, mask, schedule=schedule, router=router)
            step_mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            step = skipping_forward(
                model, ids[:, -1:], step_mask, schedule=schedule, router=router, threshold=0.0,
                cache=prefill.cache, route_dense_decode=route,
            )  # fmt: skip
        outs.append(step)
    fast, routed = outs
    assert all(r.state is None for r in fast.routes) and any(r.state is not None for r in routed.routes)
    assert all(torch.equal(a.keep, b.keep) for a, b in zip(fast.routes, routed.routes, strict=True))
    assert torch.allclose(fast.logits, routed.logits, atol=1e-6)
    for layer in range(4):
        assert torch.equal(fast.cache.keys[layer], routed.cache.keys[layer])
