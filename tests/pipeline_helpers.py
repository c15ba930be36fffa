"""A tiny end-to-end job (seconds per stage on 2 cores) and a CLI runner for the pipeline tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

TINY_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}

TINY_JOB = {
    "seed": 0,
    "device": "cpu",
    "stages": ["sft", "dpo", "rm", "ppo", "eval"],
    "task": {"n_sft": 256, "n_pairs": 128, "n_eval_pairs": 64, "n_prompts": 64, "n_eval": 16},
    "policy": {"builtin": "tiny-llama", "arch": TINY_ARCH},
    "reward_model": {"builtin": "tiny-llama", "arch": TINY_ARCH},
    "sft": {"max_steps": 150, "batch_size": 32, "lr": 1e-2},
    "dpo": {"max_steps": 4, "batch_size": 16},
    "rm": {"max_steps": 4, "batch_size": 16},
    "ppo": {
        "steps": 2, "rollout_batch_size": 8, "train_batch_size": 8, "micro_batch_size": 4,
        "max_new_tokens": 16, "checkpoint_every": 1, "tensorboard": True,
    },
    "eval": {"max_new_tokens": 24, "batch_size": 16},
    "resources": {"num_cpus": 2, "policy": {"ranks": 2, "cpus": 0.25}},
}  # fmt: skip


def write_job(directory: Path, base: dict | None = None, **changes) -> Path:
    """`base` (default `TINY_JOB`) with `section__field=value` changes, written to directory/job.yaml."""
    job = yaml.safe_load(yaml.safe_dump(base or TINY_JOB))
    for dotted, value in changes.items():
        node = job
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def rto(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "rto.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def rto_in_process(*args: str) -> subprocess.CompletedProcess:
    """`rto ARGS` through the CLI's own `main()` in this process (`_trace_run_fixtures.run_cli`: the
    same exit codes and messages as the console script, without a new interpreter's start-up), for
    commands that start no Ray: a refused `rto run`, `rto score`. It must not leave Ray running."""
    import ray
    from _trace_run_fixtures import run_cli

    running_before = ray.is_initialized()
    code, out, err = run_cli(*args)
    assert running_before or not ray.is_initialized(), f"rto {' '.join(args)} started Ray in the test process"
    return subprocess.CompletedProcess(["rto", *args], code, out, err)


def one_line_error(code: int, err: str, words: list[str], expected: int = 2) -> None:
    """Exit `expected` with one `error: ...` line, the last thing printed (progress lines of the
    work done before may precede it), holding `words`."""
    assert code == expected, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], (word, errors[0])


def run_ppo_steps(
    reward_run: Path, tmp_path: Path, name: str, steps: int, between=None, inspect=None, **changes
):
    """``steps`` PPO iterations through `rto.ppo.trainer.one_step` on freshly built groups, in a copy
    of ``reward_run`` (finished sft, dpo and rm stages) named ``name``, with the tiny job's
    ``changes``. ``between(groups, step, state)`` runs after each step and ``inspect(groups)`` after
    the last, before the groups are shut down. Returns (run directory, records, config, what
    ``inspect`` returned)."""
    import shutil

    import ray

    from pipelines.prepare import prepare
    from pipelines.prompts import TextPrompts
    from pipelines.stages.rm import load_normalization
    from rto.config import load_config
    from rto.distributed import init_ray
    from rto.models import load_tokenizer
    from rto.ppo.groups import ModelPaths, build_groups
    from rto.ppo.trainer import PPOInputs, one_step
    from rto.rundir import RunDir

    run_dir = tmp_path / name
    shutil.copytree(reward_run, run_dir)
    (tmp_path / f"{name}-job").mkdir()
    cfg = load_config(write_job(tmp_path / f"{name}-job", stages=["ppo"], **changes))
    run = RunDir(run_dir)
    prepared = prepare(cfg, run)
    stages = run_dir / "stages"
    paths = ModelPaths(
        policy=str(stages / "sft"), critic=str(stages / "rm"), ref=str(stages / "sft"),
        dpo=str(stages / "dpo"), rm=str(stages / "rm"),
    )  # fmt: skip
    init_ray(None, 2)
    groups = build_groups(cfg, paths, optimizer_steps=steps, dtype="float32")
    try:
        tokenizer = load_tokenizer(paths.policy)
        inputs = PPOInputs(
            cfg=cfg, run=run, out_dir=tmp_path / f"{name}-out", paths=paths,
            prompts=TextPrompts(tokenizer, prepared.records("prompts")), tokenizer=tokenizer,
            processing_class=tokenizer, ground_truth=prepared.ground_truth(),
            rm_normalization=load_normalization(stages / "rm"), stage_hash="test", resume=False,
        )  # fmt: skip
        run.traces_dir.mkdir(exist_ok=True)
        state = {"step": 0, "prompts_consumed": 0, "skipped_batches": 0, "dpo_refreshes": 0}
        records = []
        for step in range(1, steps + 1):
            records.append(one_step(inputs, groups, state, step))
            if between is not None:
                between(groups, step, state)
        inspected = inspect(groups) if inspect is not None else None
    finally:
        groups.shutdown()
        ray.shutdown()
    return run_dir, records, cfg, inspected
