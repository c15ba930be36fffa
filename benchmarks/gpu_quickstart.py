"""The quickstart on a GPU in bf16, with the time of every stage and of every PPO phase.

    python benchmarks/gpu_quickstart.py [--run-dir runs/quickstart-gpu] [--set ppo.steps=60 ...]

Equivalent to `rto run configs/quickstart.yaml --set device=cuda --set dtype=bfloat16`; all Ray actors
share the one GPU (rto gives each an equal fraction when no `resources.*.gpus` is set). Writes
benchmarks/results/gpu_quickstart.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from pipelines.runner import run_job  # noqa: E402
from rto.config import load_config  # noqa: E402
from rto.rundir import RunDir  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/quickstart-gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    overrides = [f"device={args.device}", f"dtype={args.dtype}", *args.overrides]
    cfg = load_config(QUICKSTART, overrides)
    summary = run_job(cfg, args.run_dir)
    rows = [r for r in RunDir(args.run_dir).read_metrics("ppo") if "time_step" in r]
    phases = (
        {
            k: statistics.median(r[k] for r in rows)
            for k in ("time_generate", "time_score", "time_train", "time_sync", "time_step")
        }
        if rows
        else {}
    )
    stages = {name: summary[name]["seconds"] for name in cfg.stages if name in summary}
    print(f"{'stage':<8} {'seconds':>8}")
    for name, seconds in stages.items():
        print(f"{name:<8} {seconds:>8.1f}")
    for name, seconds in phases.items():
        print(f"ppo {name:<14} median {seconds:.3f} s")
    write_results(
        "gpu_quickstart",
        {"overrides": overrides},
        {"stage_seconds": stages, "ppo_phase_median_seconds": phases, "eval": summary.get("eval")},
    )


if __name__ == "__main__":
    main()
