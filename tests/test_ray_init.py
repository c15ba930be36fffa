"""`init_ray(None)` starts Ray in-process: it never joins a cluster that `ray start` left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import ray
from rto.distributed.groups import init_ray
init_ray(None, num_cpus=1)
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
ray.shutdown()
"""


def test_in_process_ray_ignores_the_address_file_of_an_earlier_ray_start():
    """`ray.init()` without an address joins the cluster named in `<tmp>/ray/ray_current_cluster`
    (what `ray start` writes). An in-process run must start its own: here the file names an address
    where nothing listens, as after a crashed or finished `ray start`."""
    tmp = Path(tempfile.mkdtemp(prefix="rto-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
        env = {**os.environ, "TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-2000:]
        (line,) = [x for x in result.stdout.splitlines() if x.startswith("GCS ")]
        assert line.split()[1] != "127.0.0.1:9"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOOPBACK_PROBE = """
import ray
from rto.distributed.groups import init_ray
init_ray(None, num_cpus=1)
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
print("NODES", " ".join(n["NodeManagerAddress"] for n in ray.nodes()), flush=True)
ray.shutdown()
"""


def test_in_process_ray_listens_on_loopback_only():
    """A laptop run's Ray (GCS, raylet, object manager) binds to 127.0.0.1, not to the machine's
    network address: nothing outside the machine can reach the run's actors."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", LOOPBACK_PROBE], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(x.split(" ", 1) for x in result.stdout.splitlines() if x.startswith(("GCS ", "NODES ")))
    assert lines["GCS"].rsplit(":", 1)[0] == "127.0.0.1"
    assert lines["NODES"].split() == ["127.0.0.1"]


def test_ray_starts_beside_the_last_stage_before_ppo_only():
    """The runner starts the ppo stage's local Ray on a thread while the stage run last before ppo
    in this process trains (`ray_warm_up_due`): not earlier (its processes would take the spare core
    from a stage running beside), never for a cluster (`resources.ray_address`: it is up already),
    and not when ppo is up to date."""
    from pipelines.runner import ray_warm_up_due
    from rto.config import load_config

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(quickstart)  # sft, dpo, rm, ppo, eval
    every = set(cfg.stages)
    assert not ray_warm_up_due(cfg, "sft", every, {"rm"})  # dpo runs here between sft and ppo
    assert ray_warm_up_due(cfg, "dpo", every, {"rm"})  # rm runs beside: dpo is the last one here
    assert not ray_warm_up_due(cfg, "dpo", every, set())  # rm still to run here after dpo
    assert ray_warm_up_due(cfg, "rm", every, set())
    assert ray_warm_up_due(cfg, "sft", every - {"dpo", "rm"}, set())  # up to date: nothing between
    assert not ray_warm_up_due(cfg, "dpo", every - {"ppo"}, {"rm"})  # ppo up to date
    assert not any(ray_warm_up_due(cfg, s, every, {"rm"}) for s in ("ppo", "eval"))
    cluster = load_config(quickstart, ["resources.ray_address=auto"])
    assert not ray_warm_up_due(cluster, "dpo", every, {"rm"})
