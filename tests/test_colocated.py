"""Colocated mode (`resources.colocate: all`, issue 19): one process per rank holds every model and
samples with the policy's own weights. It computes what the distributed groups compute: the first
steps' traces are the same for the same seed. Critic-free estimators build no critic at all."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import one_line_error, rto, run_ppo_steps, write_job

COMPARED = ("token_ids", "logprob", "ref_logprob", "dpo_logprob", "reward", "value", "advantage", "return")


def run_steps(reward_run, tmp_path, name: str, steps: int, **changes):
    """``steps`` PPO iterations on freshly built groups; the run directory, the records and the
    groups' layout."""

    def layout(groups) -> dict:
        return {
            "colocated": groups.colocated is not None,
            "actors": len({a for g in groups.all() for a in g.actor_ids()}),
            "critic": groups.critic is not None,
            "shares_weights": groups.colocated.run_all("shares_weights") if groups.colocated else None,
        }

    run_dir, records, _, inspected = run_ppo_steps(
        reward_run, tmp_path, name, steps, inspect=layout, **changes
    )
    return run_dir, records, inspected


def traces(run_dir, step):
    return pq.read_table(run_dir / "traces" / f"step-{step:06d}.parquet").to_pylist()


def test_colocated_steps_match_the_distributed_groups(reward_run, tmp_path):
    """Two steps each way, same seed: same rollouts (step 2's come from the updated weights, which
    the colocated sampler never received by a push) and the same scores, rewards, values and
    advantages, to float tolerance."""
    common = dict(ppo__steps=2, ppo__micro_batch_size=4, resources__policy__ranks=1)  # one sampling stream
    spread, spread_records, spread_layout = run_steps(reward_run, tmp_path, "spread", 2, **common)
    shared, shared_records, shared_layout = run_steps(
        reward_run, tmp_path, "shared", 2, resources__colocate="all", **common
    )
    assert spread_layout == {"colocated": False, "actors": 6, "critic": True, "shares_weights": None}
    assert shared_layout == {"colocated": True, "actors": 1, "critic": True, "shares_weights": [True]}
    for step in (1, 2):
        a, b = traces(spread, step), traces(shared, step)
        assert len(a) == len(b) > 0
        for row_a, row_b in zip(a, b, strict=True):
            assert row_a["response"] == row_b["response"]
            for column in COMPARED:
                x, y = row_a[column], row_b[column]
                assert len(x) == len(y), column
                assert max((abs(p - q) for p, q in zip(x, y, strict=True)), default=0.0) < 1e-4, (
                    step,
                    column,
                )
    for ra, rb in zip(spread_records, shared_records, strict=True):
        assert ra["first_minibatch_ratio_error"] < 1e-4 and rb["first_minibatch_ratio_error"] < 1e-4
        assert rb["first_minibatch_value_clip_frac"] == 0.0
        assert abs(ra["policy_loss"] - rb["policy_loss"]) < 1e-4
        assert abs(ra["value_loss"] - rb["value_loss"]) < 1e-4


@pytest.fixture(scope="module")
def semi_rto_reinforce_step(reward_run, tmp_path_factory):
    """One colocated step on two ranks with REINFORCE++ (critic-free) and the semi-RTO reward (the
    DPO term summed onto each sentence's full stop). The critic-free test and the semi-RTO test
    check independent parts of it: the estimator reads the composed per-token rewards, whatever
    the mode that composed them."""
    return run_steps(
        reward_run, tmp_path_factory.mktemp("semi-reinforce"), "semi-reinforce", 1,
        resources__colocate="all", reward__mode="semi_rto", ppo__advantage_estimator="reinforce_pp",
        ppo__micro_batch_size=4,
    )  # fmt: skip


def test_critic_free_estimator_builds_no_critic_and_its_advantages_recompute(semi_rto_reinforce_step):
    """REINFORCE++ with a token reward, colocated on two ranks: no critic anywhere, no value in the
    traces, and each trace row's advantage is its reward-to-go (γ = 1) of the logged rewards."""
    run_dir, records, layout = semi_rto_reinforce_step
    assert layout == {
        "colocated": True,
        "actors": 2,
        "critic": False,
        "shares_weights": [True, True],
    }  # 2 ranks
    record = records[0]
    assert "value_loss" not in record and record["first_minibatch_ratio_error"] < 1e-4
    for row in traces(run_dir, 1):
        assert row["value"] is None
        to_go, expected = 0.0, []
        for reward in reversed(row["reward"]):
            to_go += reward
            expected.append(to_go)
        assert max(abs(a - b) for a, b in zip(expected[::-1], row["advantage"], strict=True)) < 1e-5


def test_colocated_critic_free_job_runs_end_to_end(colocated_rloo_run):
    """`rto run` with colocate: all and RLOO (3 steps, a checkpoint after step 2; the shared run of
    conftest.py): a policy folder and no critic."""
    _, run_dir, result = colocated_rloo_run
    assert "placement policy" in (run_dir / "rto.log").read_text() + result.stderr
    assert (run_dir / "stages" / "ppo" / "policy" / "config.json").is_file()
    assert not (run_dir / "stages" / "ppo" / "critic").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ppo"]["steps"] == 3


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(resources__colocate="all", resources__critic__ranks=3), ["resources.critic.ranks", "colocate"]),
        (
            dict(resources__colocate="all", resources__policy__strategy="SPREAD"),
            ["resources.policy.strategy"],
        ),
        (dict(resources__colocate="some"), ["resources.colocate"]),
        (dict(ppo__advantage_estimator="grpo"), ["ppo.samples_per_prompt", "grpo"]),
    ],
)
def test_bad_colocated_or_estimator_settings_are_one_line_errors(tmp_path, changes, words):
    job = write_job(tmp_path, **changes)
    result = rto("validate", str(job))
    one_line_error(result.returncode, result.stderr, [str(job), *words])


def test_semi_rto_step_puts_each_sentence_dpo_reward_on_its_full_stop(semi_rto_reinforce_step):
    """Mode `semi_rto` through a real step: the DPO term is nonzero only on '.' tokens and on the
    last token, and each row's reward still adds up from its components."""
    run_dir, records, _ = semi_rto_reinforce_step
    rows = traces(run_dir, 1)
    assert any("." in row["tokens"][:-1] for row in rows)  # some response has a sentence before its end
    for row in rows:
        n = len(row["tokens"])
        for h, (token, dpo) in enumerate(zip(row["tokens"], row["reward_dpo"], strict=True)):
            if token != "." and h != n - 1:
                assert dpo == 0.0, (h, token, dpo)
        for h in range(n):
            expected = row["reward_dpo"][h] + row["reward_kl"][h] + (row["rm_score"] if h == n - 1 else 0.0)
            assert abs(row["reward"][h] - expected) < 1e-5
