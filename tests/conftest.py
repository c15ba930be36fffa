import os
import shutil

# Tests run many small torch programs side by side on a 2-core machine: one thread each avoids
# oversubscription (which slows tiny models down by an order of magnitude).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402
from pipeline_helpers import rto, write_job  # noqa: E402


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory):
    """A run directory with finished sft, dpo and rm stages of the tiny job, shared by the PPO test
    modules (each test copies it before writing)."""
    root = tmp_path_factory.mktemp("reward")
    job = write_job(root, stages=["sft", "dpo", "rm"])
    result = rto("run", str(job), "--run-dir", str(root / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="session")
def colocated_rloo_run(reward_run, tmp_path_factory):
    """`rto run` of a colocated RLOO ppo stage (3 steps, a checkpoint after step 2, the held-out
    figure every 2 steps, prompts cut to the first 6) and a greedy eval stage of its policy, in a copy
    of the reward run: shared by test_colocated and test_ppo_pipeline, which check different parts
    of it. Returns (job file, run directory)."""
    root = tmp_path_factory.mktemp("colocated-rloo")
    run_dir = root / "run"
    shutil.copytree(reward_run, run_dir)
    job = write_job(
        root, stages=["ppo", "eval"], ppo__steps=3, ppo__checkpoint_every=2, ppo__samples_per_prompt=2,
        ppo__rollout_batch_size=4, ppo__train_batch_size=8, ppo__micro_batch_size=4,
        ppo__advantage_estimator="rloo", ppo__eval_every=2, ppo__max_prompts=6, eval__temperature=0,
        eval__models=["ppo"], resources__colocate="all",
    )  # fmt: skip
    result = rto("run", str(job), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return job, run_dir, result
