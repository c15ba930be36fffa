"""The stage runner end to end through the real CLI: sft + eval on the built-in task, the stage
cache, recovery from a kill mid-stage, and external data with a local model folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from pipeline_helpers import TINY_ARCH, rto, rto_in_process, write_job
from transformers import AutoModelForCausalLM, AutoTokenizer

from rto.rundir import MARKER


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, reward_run):
    """`rto run` of sft + eval, in a run directory that holds the shared reward run's sft stage (the
    same job settings, trained by `rto run` once for the session) and nothing of its other stages:
    the sft stage is taken from the stage cache and eval runs."""
    root = tmp_path_factory.mktemp("sft")
    run_dir = root / "run"
    shutil.copytree(
        reward_run, run_dir, ignore=lambda d, names: ["dpo", "rm"] if d.endswith("stages") else []
    )
    keep_only_stage(run_dir, "sft")
    job = write_job(root, stages=["sft", "eval"])
    result = rto("run", str(job), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage sft: up to date, skipped" in result.stderr  # the cached sft stage
    assert "stage eval: done" in result.stderr
    return root, job, result


def keep_only_stage(run_dir, stage: str) -> None:
    """Leave the metrics and summary records of `stage` only, as a run of that stage alone has them."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["stage"] == stage]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({stage: summary[stage]}))


def test_sft_then_eval_reports_and_beats_random_init(sft_run):
    root, _, _ = sft_run
    summary = json.loads((root / "run" / "summary.json").read_text())
    policies = summary["eval"]["policies"]
    assert set(policies) == {"base", "sft"}
    assert policies["sft"]["grammatical"] > policies["base"]["grammatical"] + 0.2
    assert policies["sft"]["gt_reward"] > policies["base"]["gt_reward"] + 0.5
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m["stage"] == "sft" and "loss" in m for m in metrics)
    assert (root / "run" / "config.yaml").is_file()


def test_stage_output_loads_with_plain_transformers(sft_run):
    root, _, _ = sft_run
    folder = root / "run" / "stages" / "sft"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "describe the cat"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_second_run_skips_finished_stages(sft_run):
    root, job, _ = sft_run
    marker = root / "run" / "stages" / "sft" / MARKER
    before = marker.read_text()
    result = rto("run", str(job), "--run-dir", str(root / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage sft: up to date, skipped" in result.stderr
    assert "stage eval: up to date, skipped" in result.stderr
    assert marker.read_text() == before
    # a changed setting invalidates that stage and the ones that used it
    result = rto("run", str(job), "--run-dir", str(root / "run"), "--set", "eval.temperature=0")
    assert "stage sft: up to date, skipped" in result.stderr
    assert "stage eval: done" in result.stderr


def test_kill_mid_stage_then_rerun_completes(tmp_path):
    job = write_job(tmp_path, stages=["sft"], sft__max_steps=400)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rto.cli", "run", str(job), "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        '"stage": "sft"' in line for line in _lines(run_dir / "metrics.jsonl")
    ):
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert list((run_dir / "stages").glob(".sft.tmp-*"))  # it was killed mid-stage ...
    assert not (run_dir / "stages" / "sft").exists()  # ... and left nothing that looks finished
    result = rto("run", str(job), "--run-dir", str(run_dir), "--set", "sft.max_steps=10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "stages" / "sft" / MARKER).is_file()
    assert not list((run_dir / "stages").glob(".sft.tmp*"))  # the next run swept what the killed one left
    AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "sft")


def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []


def test_external_data_and_local_model_folder(tmp_path):
    """The same stages on TRL-format JSONL files and a model given as a local folder."""
    from pipelines.tasks import text

    tokenizer = text.build_tokenizer()
    model = AutoModelForCausalLM.from_config(text.llama_config(tokenizer, TINY_ARCH))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    settings = text.TaskSettings(n_sft=64)
    text.write_jsonl(tmp_path / "sft.jsonl", text.sft_records(settings))
    prompts = [
        {"prompt": r["prompt"][0]["content"]} for r in text.prompt_records(settings, 8, "eval")
    ]  # plain strings
    text.write_jsonl(tmp_path / "prompts.jsonl", prompts)
    job = write_job(
        tmp_path, stages=["sft", "eval"], task=None, policy={"path": str(tmp_path / "model")},
        reward_model={"path": str(tmp_path / "model")},
        data={"sft": {"path": str(tmp_path / "sft.jsonl")}, "eval_prompts": {"path": str(tmp_path / "prompts.jsonl")}},
        sft__max_steps=2, eval__models=["sft"],
    )  # fmt: skip
    result = rto("run", str(job), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "gt_reward" not in summary["eval"]["policies"]["sft"]  # no ground truth for external data
    assert summary["eval"]["policies"]["sft"]["samples"] == 8
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stages" / "sft")
    assert not torch.equal(trained.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "rows,words",
    [
        ([{"prompt": "describe the cat", "completion": ""}], ["row 1", "empty 'completion'"]),
        ([{"question": "x", "answer": "y"}], ["missing columns", "prompt/completion"]),
    ],
)
def test_bad_data_files_exit_2(tmp_path, rows, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = write_job(tmp_path, stages=["sft"], data={"sft": {"path": str(path)}})
    result = rto_in_process("run", str(job), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr
    assert str(path) in result.stderr
