"""A synthetic run directory (traces, metrics, summary) with hand-chosen numbers, for the trace
view and report tests: no training needed."""

from __future__ import annotations

import json
from pathlib import Path

from reward.traces import trace_path, write_traces

WORDS = ["the", "cat", "sees", "a", "kind", "dog", "."]
STEPS = [1, 2, 3]


def sample_row(step: int, sample_id: int) -> dict:
    """Sample `sample_id` of `step`: three tokens (+ <eos>); its numbers grow with the id, so sample 3
    is the best by total reward and sample 0 the worst."""
    k = sample_id + 1
    dpo = [0.1 * k, -0.05, 0.02 * k, 0.0]
    kl = [-0.01, -0.02 * k, 0.0, -0.01]
    rm = 0.5 * k - 1.0
    reward = [d + q for d, q in zip(dpo, kl, strict=True)]
    reward[-1] += rm
    tokens = [WORDS[(sample_id + i + step) % len(WORDS)] for i in range(3)] + ["<eos>"]
    return {
        "step": step,
        "sample_id": sample_id,
        "prompt": f"describe thing {sample_id}",
        "response": " ".join(tokens[:-1]),
        "tokens": tokens,
        "token_ids": [WORDS.index(t) if t in WORDS else 99 for t in tokens],
        "logprob": [-1.0, -2.0, -0.5, -0.1],
        "ref_logprob": [-1.1, -1.9, -0.5, -0.2],
        "dpo_logprob": [-0.9, -2.1, -0.4, -0.2],
        "reward_dpo": dpo,
        "reward_kl": kl,
        "reward": reward,
        "value": [0.1 * k, 0.2, 0.3, 0.4],
        "advantage": [0.05 * k, -0.1, 0.0, 0.1 * k],
        "return": [0.2, 0.1, 0.3, 0.5],
        "rm_score": rm,
        "gt_reward": float(sample_id) - 1.5,
    }


def write_step(traces_dir: Path, step: int, samples: int = 4) -> Path:
    return write_traces(trace_path(traces_dir, step), [sample_row(step, i) for i in range(samples)])


def metrics_record(stage: str, step: int) -> dict:
    if stage != "ppo":
        return {"stage": stage, "step": step, "loss": 3.0 / step}
    return {
        "stage": "ppo", "step": step, "samples": 4, "gt_reward": 0.1 * step, "rm_score": 0.2 * step,
        "reward_total": 0.3 * step, "reward_dpo": 0.1, "reward_kl": -0.01 * step, "kl": 0.5 * step,
        "approx_kl": 0.001, "policy_loss": 0.01, "value_loss": 0.2 / step, "response_length": 3.0,
        "terminated": 1.0, "entropy": 2.0, "clip_frac": 0.0,
    }  # fmt: skip


def make_run(root: Path, steps: list[int] = STEPS, cut_last_metrics_line: bool = True) -> Path:
    """A run directory as a ppo stage leaves it mid-run: sft done, ppo steps `steps` traced, a
    metrics line cut mid-write and a writer's temp file in traces/."""
    run = Path(root)
    (run / "traces").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("stages: [sft, ppo]\nseed: 0\n")
    (run / "summary.json").write_text(
        json.dumps({"sft": {"steps": 20, "train_loss": 1.5},
                    "eval": {"policies": {"sft": {"gt_reward": 0.25}, "ppo": {"gt_reward": 0.5}}}})
    )  # fmt: skip
    lines = [json.dumps(metrics_record("sft", s)) for s in (10, 20)]
    lines += [json.dumps(metrics_record("ppo", s)) for s in steps]
    text = "\n".join(lines) + "\n"
    if cut_last_metrics_line:
        text += json.dumps(metrics_record("ppo", max(steps) + 1))[:25]  # a writer killed mid-line
    (run / "metrics.jsonl").write_text(text)
    for step in steps:
        write_step(run / "traces", step)
    (run / "traces" / f".step-{max(steps) + 1:06d}.parquet.tmp-1234-abcd").write_bytes(b"PAR1 partial")
    return run


def run_cli(*args: str) -> tuple[int, str, str]:
    """`rto ARGS` in this process, through the same `main()` (exit-code mapping included) as the
    console script, without a new interpreter's start-up: (exit code, stdout, stderr)."""
    import contextlib
    import io
    import os
    import sys

    from rto.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["rto", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return code, out.getvalue(), err.getvalue()
