"""FTP sparsity scheduler (genetic search under a budget) and router training."""

import pytest
import torch
from test_ftp_forward import ReplayRouter

from prune.flops import (
    LayerShape,
    decoder_layer_flops,
    dense_prefill_flops,
    token_sparsity_prefill_flops,
    token_sparsity_rollout_flops,
)
from prune.ftp.config import FTPConfig
from prune.ftp.forward import skipping_forward
from prune.ftp.models import random_causal_lm
from prune.ftp.router import Router
from prune.ftp.scheduler import dense_logits, genetic_search, project_to_budget, search_schedule
from prune.ftp.train import router_loss, train_router


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration(n_batches: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, 128, (4, 20), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        batches.append((ids, mask))
    return batches


def test_projection_hits_budget_and_bounds():
    projected = project_to_budget(torch.tensor([0.9, -0.3, 0.2, 0.5, 0.1]), 0.3, 0.6)
    assert float(projected.mean()) == pytest.approx(0.3, abs=1e-9)
    assert float(projected.min()) >= 0 and float(projected.max()) <= 0.6


def test_genetic_search_respects_budget_and_beats_uniform():
    weights = torch.tensor([8.0, 1.0, 1.0, 4.0, 0.5, 0.5])  # a block's cost of sparsity

    def fitness(schedule):
        return float((weights * torch.tensor(schedule) ** 2).sum())

    evaluated = []
    best, history = genetic_search(
        lambda s: evaluated.append(s) or fitness(s),
        6,
        0.3,
        max_block=0.7,
        population=12,
        generations=15,
        seed=0,
    )
    for schedule in evaluated + [best]:
        assert sum(schedule) / 6 == pytest.approx(0.3, abs=1e-6)
        assert min(schedule) >= 0 and max(schedule) <= 0.7 + 1e-12
    assert fitness(best) < 0.8 * fitness([0.3] * 6)
    assert best[0] < 0.3 and best[4] > 0.3  # sparsity moves to the cheap blocks
    assert history[-1]["best"] <= history[0]["best"]


def test_schedule_search_on_a_model_respects_budget():
    model = random_causal_lm("llama")
    search = FTPConfig(search={"population": 4, "generations": 3}).search
    best, history = search_schedule(model, "static", calibration(1), 0.4, search, max_block=0.8)
    assert len(best) == 4 and sum(best) / 4 == pytest.approx(0.4, abs=1e-6)
    assert history[-1]["best"] <= history[0]["best"]


def test_short_router_training_lowers_its_loss():
    model = random_causal_lm("llama")
    batches = calibration(2)
    schedule = [0.0, 0.4, 0.4, 0.4]
    teacher = dense_logits(model, batches)
    torch.manual_seed(0)
    router = Router()

    def evaluate():
        torch.manual_seed(123)  # same Gumbel noise before and after
        with torch.no_grad():
            return sum(
                float(
                    router_loss(
                        model, router, schedule, ids, mask, t, guide_w=1.0, sparsity_w=1.0, distill_w=1.0
                    )[0]
                )
                for (ids, mask), t in zip(batches, teacher, strict=True)
            )

    before = evaluate()
    settings = FTPConfig(train={"steps": 30, "lr": 1e-2, "guide_decay": 1.0}).train
    history = train_router(model, router, schedule, batches, settings)
    after = evaluate()
    assert len(history) == 30
    assert after < 0.8 * before
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # the LLM stays frozen


def test_token_sparsity_flops():
    config = random_causal_lm("llama").config
    dense = dense_prefill_flops(config, 100)
    assert token_sparsity_prefill_flops(config, 100, [0.0] * 4) == pytest.approx(dense)
    half = token_sparsity_prefill_flops(config, 100, [0.0, 0.0, 1.0, 1.0])
    assert half == pytest.approx(dense / 2)
    assert 0.5 * dense < token_sparsity_prefill_flops(config, 100, [0.3] * 4) < 0.7 * dense


def test_rollout_flops_count_prefill_and_decode():
    """By hand: a dense rollout is a prefill of the prompt, then one token per step attending to
    every earlier one; pruning the prefill shrinks both (fewer cached keys); removed blocks cost
    nothing; decode skipping scales the decode share."""
    config = random_causal_lm("llama").config
    shape = LayerShape.from_config(config)
    prefill, decode = token_sparsity_rollout_flops(config, 10, 3, [0.0] * 4)
    assert prefill == pytest.approx(dense_prefill_flops(config, 10))
    by_hand = sum(decoder_layer_flops(shape, 1, 10 + t + 1).total for t in range(3))
    assert decode == pytest.approx(4 * by_hand)
    # the whole rollout is one causal pass over prompt + response
    assert prefill + decode == pytest.approx(dense_prefill_flops(config, 13))
    pruned_prefill, pruned_decode = token_sparsity_rollout_flops(config, 10, 3, [0.5, 0.5, 0.0, 1.0])
    assert pruned_prefill == pytest.approx(token_sparsity_prefill_flops(config, 10, [0.5, 0.5, 0.0, 1.0]))
    assert pruned_decode == pytest.approx(
        2 * sum(decoder_layer_flops(shape, 1, 5 + t + 1).total for t in range(3)) + by_hand
    )
    _, half = token_sparsity_rollout_flops(config, 10, 3, [0.0] * 4, decode_keep=[0.5] * 4)
    assert 0.45 * decode < half < 0.5 * decode


def test_fit_save_and_generate_through_the_sampler_registry(tmp_path):
    from prune.ftp.fit import fit_ftp
    from prune.ftp.router import model_fingerprint, save_router
    from prune.samplers import samplers

    model = random_causal_lm("llama")
    cfg = FTPConfig(
        sparsity=0.3,
        search={"population": 3, "generations": 2, "elite": 1},
        train={"steps": 4},
        decode_threshold="calibrated",
        calib_decode_tokens=4,
    )
    prompts = [(torch.randint(3, 128, (2, 6)), torch.ones(2, 6, dtype=torch.long))]
    result = fit_ftp(model, calibration(1), calibration(1, seed=1), cfg, prompts, log=lambda _: None)
    assert isinstance(result.router, Router) and len(result.history) == 4
    assert sum(result.schedule) / 4 == pytest.approx(0.3, abs=1e-6)
    assert len(result.decode_thresholds) == 4
    save_router(
        tmp_path,
        result.router,
        result.schedule,
        model_fingerprint(model),
        decode_thresholds=result.decode_thresholds,
    )
    spec = samplers().get("ftp")
    assert (spec.policies, spec.stage) == ("text", "ftp")
    model.save_pretrained(tmp_path / "policy")  # the driver checks the router against its config
    sampler = spec.build(None, str(tmp_path / "policy"), tmp_path)
    ids, mask = calibration(1)[0]
    response, logprobs = sampler(model, ids, mask, max_new_tokens=3, temperature=0, pad_token_id=0)
    assert response.shape == logprobs.shape == (4, 3)


def test_static_router_fit_feeds_rollout_workers(tmp_path):
    """`ftp.router: static` end to end: fit, save as the ftp stage does, sample PPO rollouts."""
    from prune.ftp.fit import fit_ftp
    from prune.ftp.rollout import make_generate_fn
    from prune.ftp.router import model_fingerprint, save_router
    from rto.distributed import RolloutWorker

    model = random_causal_lm("llama")
    cfg = FTPConfig(sparsity=0.3, router="static", search={"population": 3, "generations": 2, "elite": 1})
    result = fit_ftp(model, calibration(1), calibration(1, seed=1), cfg, log=lambda _: None)
    assert result.router == "static"
    assert result.decode_thresholds == cfg.decode_threshold  # not the metrics dict
    assert "kl_static_searched" in result.metrics
    save_router(
        tmp_path / "ftp", Router(cfg.router_hidden), result.schedule, model_fingerprint(model),
        kind="static", decode_thresholds=result.decode_thresholds,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "policy")
    worker = RolloutWorker(
        str(tmp_path / "policy"), generate_fn=make_generate_fn(tmp_path / "ftp"), max_new_tokens=5
    )
    ids, mask = calibration(1)[0]
    out = worker.generate({"input_ids": ids, "attention_mask": mask})
    assert out["sequences"].shape == (4, 25)
    assert bool((out["sampler_logprobs"] <= 0).all())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_forward_sees_the_factors_inference_computes(arch):
    """Router training computes every token (to pass gradients) but must route on what the
    deployed forward sees: with the same decisions, the same factors at every block (the attention
    table comes from the last kept tokens, not from skipped ones) and the same logits."""
    model = random_causal_lm(arch, num_hidden_layers=6)
    ids, mask = calibration(1)[0]
    schedule = [0.0, 0.5, 0.5, 0.3, 0.6, 0.4]
    torch.manual_seed(0)
    trained = skipping_forward(
        model, ids, mask, schedule=schedule, router=Router(), train=True, tau=1.0, n_probes=4
    )
    routed = [r for r in trained.routes if r.keep_prob is not None]
    replay = ReplayRouter([r.keep for r in routed])
    with torch.no_grad():
        deployed = skipping_forward(model, ids, mask, schedule=schedule, router=replay, n_probes=4)
    assert replay.calls == len(routed) == 5
    for block, (t, d) in enumerate(zip(trained.routes, deployed.routes, strict=True)):
        assert torch.equal(t.keep, d.keep), block
        if t.state is None:
            continue
        valid = t.valid
        for name in ("rel_pos", "attn_score", "attn_rank"):
            got, want = getattr(t.state, name)[valid], getattr(d.state, name)[valid]
            assert torch.allclose(got, want, atol=1e-5), (block, name, float((got - want).abs().max()))
    valid = mask.bool()
    assert torch.allclose(trained.logits[valid], deployed.logits[valid], atol=1e-4)
