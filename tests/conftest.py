import os

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
