"""Work moved onto a spare core gives the same bits: the rm stage beside the sft stage (a child
process) against the rm stage alone, and TRL's DPOTrainer against the one whose reference forward
runs on a second thread."""

from __future__ import annotations

import json
import os

import pytest
import torch
from pipeline_helpers import rto, write_job
from safetensors.torch import load_file

from pipelines.training import SPARE_CORE_ENV

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 * torch.get_num_threads(),
    reason="needs a core beside this process's torch threads (2 CPUs at 1 thread)",
)


@pytest.fixture(autouse=True)
def spare_core(monkeypatch):
    """Take the spare core even while other jobs load the machine (the test compares bits, not time)."""
    monkeypatch.setenv(SPARE_CORE_ENV, "1")


def same_weights(a, b) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def figures(run_dir, stage: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())[stage]
    return {k: v for k, v in summary.items() if k != "seconds"}


def test_rm_beside_sft_equals_rm_alone(tmp_path):
    beside, alone = tmp_path / "beside", tmp_path / "alone"
    job = write_job(tmp_path, stages=["sft", "rm"])
    result = rto("run", str(job), "--run-dir", str(beside))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage rm: started beside sft" in result.stderr and "(beside sft)" in result.stderr
    result = rto("run", str(job), "--run-dir", str(alone), "--set", "stages=[rm]")  # nothing to run beside
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started beside" not in result.stderr

    assert same_weights(beside / "stages" / "rm", alone / "stages" / "rm")
    assert figures(beside, "rm") == figures(alone, "rm")
    for name in ("normalization.json", "config.json"):
        assert (beside / "stages" / "rm" / name).read_text() == (alone / "stages" / "rm" / name).read_text()
    # its metrics come after the sft stage's, as a sequential run writes them
    stages = [json.loads(line)["stage"] for line in (beside / "metrics.jsonl").read_text().splitlines()]
    assert "rm" in stages and stages == sorted(stages, key=["sft", "rm"].index)
    assert not [
        p for p in (beside / "stages").iterdir() if p.name.startswith(".")
    ]  # no temporary folder left

    # a second run finds both stages done (the beside run recorded the key a sequential run would)
    result = rto("run", str(job), "--run-dir", str(beside))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage sft: up to date" in result.stderr and "stage rm: up to date" in result.stderr
    assert "started beside" not in result.stderr


def test_dpo_reference_on_a_second_thread_is_bit_identical(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipelines.training import dpo_trainer_class, quiet, trainer_kwargs
    from rto.config import load_config
    from rto.models import load_model, load_tokenizer
    from rto.runtime import seed_everything

    job = write_job(tmp_path, stages=["sft"], sft__max_steps=20)
    result = rto("run", str(job), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    sft = str(tmp_path / "run" / "stages" / "sft")
    (prepared,) = (tmp_path / "run" / "prepared").iterdir()
    pairs = [json.loads(line) for line in (prepared / "pairs.jsonl").read_text().splitlines()]
    cfg = load_config(job)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, trainer_class in (("trl", DPOTrainer), ("overlap", dpo_trainer_class())):
            seed_everything(0)
            args = DPOConfig(**trainer_kwargs(cfg, cfg.dpo, tmp_path / name, "cpu"), beta=0.1)
            models = {role: load_model(sft, "causal_lm") for role in ("model", "ref_model")}
            trainer = trainer_class(
                **models,
                args=args,
                train_dataset=Dataset.from_list(pairs),
                processing_class=load_tokenizer(sft),
            )
            result = quiet(trainer).train()
            trainer.save_model(str(tmp_path / name))
            out[name] = result.training_loss
            if name == "overlap":
                assert trainer.overlapped == result.global_step == cfg.dpo.max_steps
        assert out["trl"] == out["overlap"]
        assert same_weights(tmp_path / "trl", tmp_path / "overlap")
    finally:
        torch.set_num_threads(threads)


def test_spare_core_setting_and_measure(monkeypatch):
    from pipelines.training import others_busy, spare_cores

    monkeypatch.setenv(SPARE_CORE_ENV, "0")
    assert not spare_cores()
    monkeypatch.setenv(SPARE_CORE_ENV, "1")
    assert spare_cores()
    monkeypatch.delenv(SPARE_CORE_ENV)
    busy = others_busy()
    if os.path.exists("/proc/stat"):
        assert busy is not None and 0.0 <= busy <= len(os.sched_getaffinity(0)) + 0.5
