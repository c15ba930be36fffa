"""Bad input, command by command: each case is the file or flag, the exit code, and the words the
one-line message must hold (the file or the field it names, and what was wrong). Then a fuzz test:
seeded random byte corruptions of real job, data, trace and metrics files fed to every command
that reads them must end in exit 0 or 2, never a traceback.

Commands run in this process through the CLI's own `main()` (`run_cli`): exit-code mapping and
one-line messages are what a user sees, without a new interpreter per case."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from _trace_run_fixtures import make_run, run_cli, sample_row
from model_families import save_family_model, write_family_data
from pipeline_helpers import one_line_error

from reward.traces import trace_path

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GPT-2-like model folder, valid data files in both formats, and a run with traces."""
    root = tmp_path_factory.mktemp("bad-input")
    model = save_family_model("gpt2", root / "model")
    data = write_family_data("gpt2", root / "data", n_sft=8, n_pairs=4, n_eval_pairs=2, n_prompts=4, n_eval=2)
    run = make_run(root / "run")
    return {"root": root, "model": model, "data": data, "run": run}


def external_job(world, directory: Path, **sections) -> Path:
    job = {
        "stages": ["sft"], "task": None, "device": "cpu", "policy": {"path": str(world["model"])},
        "reward_model": {"path": str(world["model"])}, "data": {"sft": {"path": str(world["data"]["sft"])}},
        "sft": {"max_steps": 1, "batch_size": 2},
    }  # fmt: skip
    job.update(sections)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# ---------------------------------------------------------------- rto validate

VALIDATE = [
    # (job file text, words)
    ("stages: [ppo]\nreward: {beta1: .nan}\n", ["reward.beta1", "finite"]),
    ("stages: [ppo]\nreward: {clip: .inf}\n", ["reward.clip", "finite"]),
    ("stages: [ppo]\nreward: {rm_clamp: -.inf}\n", ["reward.rm_clamp"]),
    ("stages: [ppo]\nreward: {beta2: .nan}\n", ["reward.beta2"]),
    ("stages: [ppo]\nreward: {beta3: .inf}\n", ["reward.beta3"]),
    ("stages: [ppo]\nreward: {clip: 0}\n", ["reward.clip", "> 0"]),
    ("stages: [ppo]\nreward: {beta2: -1}\n", ["reward.beta2", ">= 0"]),
    ("stages: [ppo]\nppo: {steps: true}\n", ["ppo.steps", "number"]),
    ("stages: [sft]\nsft: {batch_size: false}\n", ["sft.batch_size", "number"]),
    ("stages: [sft]\nseed: true\n", ["seed", "number"]),
    ("stages: [sft]\nstages: [eval]\n", ["appears twice", "stages"]),
    ("stages: [sft]\nsft: {lr: 0.1, lr: 0.2}\n", ["appears twice", "lr"]),
    ("stages: [sft]\nseed: 4294967296\n", ["seed", "less than 4294967296"]),
    ("stages: [sft]\nseed: -1\n", ["seed", "greater than or equal to 0"]),
    ("stages: [sft]\nseed: 1.5\n", ["seed"]),
    ("stages: [sft]\ntask: {seed: 99999999999}\n", ["task", "seed"]),
    ("stages: [sft]\npolicy: {builtin: tiny-llama, arch: {hiden_size: 8}}\n", ["policy.arch.hiden_size", "unknown"]),
    ("stages: [sft]\npolicy: {builtin: tiny-llama, arch: {hidden_size: 30, num_attention_heads: 4}}\n",
     ["policy.arch.num_attention_heads", "do not divide"]),
    ("stages: [sft]\npolicy: {builtin: tiny-llama, arch: {num_attention_heads: 4, num_key_value_heads: 3}}\n",
     ["policy.arch.num_key_value_heads"]),
    ("stages: [sft]\npolicy: {builtin: tiny-llama, arch: {num_hidden_layers: -1}}\n",
     ["policy.arch.num_hidden_layers", "positive"]),
    ("stages: [sft]\npolicy: {builtin: tiny-llama, arch: {hidden_size: big}}\n", ["policy.arch.hidden_size"]),
    ("stages: [sft]\npolicy: {builtin: tiny-llama, arch: {rms_norm_eps: .nan}}\n", ["policy.arch.rms_norm_eps"]),
    ("stages: [sft]\npolicy: {builtin: tiny-llama, arch: {vision: {hidden_size: 8}}}\n", ["arch.vision"]),
    ("stages: [sft]\ntask: {name: audio}\n", ["task.name", "audio", "text", "image"]),
    ("stages: [ppo]\nreward: {missing_eos: penalty, mode: dpo}\n", ["reward.missing_eos"]),
    ("stages: [ppo]\nppo: {rollout_batch_size: 12, train_batch_size: 8, micro_batch_size: 4}\n",
     ["ppo.train_batch_size", "dropped"]),
    ("stages: [sft, ppo]\nreward: {mode: dpo}\nppo: {critic_init: rm}\n", ["reward.mode", "'dpo'"]),
    ("stages: [sft]\nppo: {temperature: .nan}\n", ["ppo.temperature"]),
    ("stages: [sft]\nftp: {sparsity: .inf}\n", ["ftp.sparsity"]),
    ("stages: [sft]\nadaptinfer: {keep_ratio: .nan}\n", ["adaptinfer.keep_ratio"]),
    ("stages: [ppo]\nppo: {fault_tolerance: {retries: -1}}\n", ["ppo.fault_tolerance.retries", "greater than or equal to 0", "got -1"]),
    ("stages: [ppo]\nppo: {fault_tolerance: {retries: 2, wait_for_resources_s: 0}}\n",
     ["ppo.fault_tolerance.wait_for_resources_s", "never be placed"]),
    ("stages: [ppo]\nppo: {fault_tolerance: {backoff_s: -1}}\n", ["ppo.fault_tolerance.backoff_s"]),
    ("stages: [ppo]\nppo: {fault_tolerance: {probe_timeout_s: 0}}\n", ["ppo.fault_tolerance.probe_timeout_s"]),
    ("stages: [ppo]\nppo: {fault_tolerance: {retries: true}}\n", ["ppo.fault_tolerance.retries", "number"]),
    ("stages: [ppo]\nppo: {fault_tolerance: {retry: 3}}\n", ["ppo.fault_tolerance.retry"]),
    ("stages: [ppo]\nresources: {policy: {strategy: SPREADOUT}}\n", ["resources.policy.strategy"]),
    ("stages: [ppo]\nresources: {rm: {node_resources: {CPU: 1}}}\n", ["resources.rm.node_resources", "custom"]),
    ("stages: [ppo]\nresources: {rm: {node_resources: {trainer: 0}}}\n", ["resources.rm.node_resources", "amount > 0"]),
    ("stages: [sft]\ntask: {name: text, variant: facts}\n", ["policy.arch.max_position_embeddings", "use at least 360"]),
    ("stages: [sft]\ntask: {name: text, variant: fact}\n", ["task.variant", "plain", "facts"]),
    ("stages: [sft]\ntask: {name: text, variant: facts, n_facts: 85}\n", ["task.n_facts", "84"]),
]  # fmt: skip


@pytest.mark.parametrize("text,words", VALIDATE, ids=[str(i) for i in range(len(VALIDATE))])
def test_validate(tmp_path, text, words):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    code, _, err = run_cli("validate", str(path))
    one_line_error(code, err, [str(path), *words])


def test_validate_files_that_are_not_job_files(tmp_path):
    cases = {
        "not_utf8.yaml": (b"stages: [sft]\nseed: \xff\xfe\n", ["not UTF-8"]),
        "folder": (None, ["is a directory"]),
        "missing.yaml": (..., ["not found"]),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif content is not ...:
            path.write_bytes(content)
        code, _, err = run_cli("validate", str(path))
        one_line_error(code, err, [str(path), *words])


# ---------------------------------------------------------------- rto run (data)

DATA_ROWS = [
    # (rows of the sft file after a good first row, words)
    ([{"prompt": 7, "completion": "the cat ."}], ["row 2", "'prompt'", "an integer"]),
    ([{"prompt": "describe the cat"}], ["row 2", "no 'completion'"]),
    ([{"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}], ["row 2", "'prompt' is a conversation"]),
    ([["not", "an", "object"]], ["row 2", "not an object"]),
    ([{"prompt": "describe the cat", "completion": ["a", "b"]}], ["row 2", "'completion'"]),
    ([{"prompt": "describe the cat", "completion": "  "}], ["row 2", "empty 'completion'"]),
    ([{"prompt": "describe the cat", "completion": {"text": "x"}}], ["row 2", "an object"]),
]  # fmt: skip


@pytest.mark.parametrize("rows,words", DATA_ROWS, ids=[str(i) for i in range(len(DATA_ROWS))])
def test_run_refuses_bad_rows_anywhere_in_a_data_file(world, tmp_path, rows, words):
    data = tmp_path / "sft.jsonl"
    good = {"prompt": "describe the cat", "completion": "the cat sees a dog ."}
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, *rows]))
    job = external_job(world, tmp_path, data={"sft": {"path": str(data)}})
    code, _, err = run_cli("run", str(job), "--run-dir", str(tmp_path / "run"))
    one_line_error(code, err, [str(data), "data.sft.path", *words])
    assert not (tmp_path / "run" / "config.yaml").exists()  # not accepted: no record written


def test_run_refuses_data_that_is_not_text(world, tmp_path):
    for name, content, words in [
        ("binary.jsonl", b'{"prompt": "\xff\xfe"}\n', ["cannot load data"]),
        ("list.jsonl", b"[1, 2]\n", ["row 1", "not an object"]),
        ("fake.parquet", b"PAR1 this is not parquet", ["cannot load data"]),
    ]:
        data = tmp_path / name
        data.write_bytes(content)
        job = external_job(world, tmp_path / name.split(".")[0], data={"sft": {"path": str(data)}})
        code, _, err = run_cli("run", str(job), "--run-dir", str(tmp_path / "run"))
        one_line_error(code, err, [str(data), *words])


def test_run_says_when_there_is_nothing_to_resume(world, tmp_path):
    job = external_job(world, tmp_path)
    code, out, err = run_cli("run", str(job), "--run-dir", str(tmp_path / "run"), "--resume")
    assert code == 0, err
    assert "nothing to resume" in out + err


# ---------------------------------------------------------------- rto score

SCORE_RESPONSES = [
    # (file name, content, words)
    ("ints.jsonl", b'{"prompt": 3, "response": "the cat ."}\n', ["row 1", "'prompt'", "an integer"]),
    ("array.jsonl", b'{"prompt": "hi", "response": [1, 2]}\n', ["row 1", "'response'"]),
    ("nested.jsonl", b'{"prompt": "hi", "response": {"a": 1}}\n', ["row 1", "'response'"]),
    ("binary.jsonl", b'{"prompt": "hi", "response": "\xff"}\n', ["line 1", "not UTF-8"]),
    ("fake.parquet", b"PAR1 definitely not parquet", ["not a readable Parquet file"]),
    ("list.jsonl", b"[1]\n", ["row 1", "not an object"]),
    ("missing.jsonl", b'{"prompt": "hi"}\n', ["row 1", "'response'"]),
    ("empty.jsonl", b"\n", ["no responses"]),
]  # fmt: skip


@pytest.mark.parametrize("name,content,words", SCORE_RESPONSES, ids=[c[0] for c in SCORE_RESPONSES])
def test_score_refuses_bad_responses_before_any_work(world, tmp_path, name, content, words):
    responses = tmp_path / name
    responses.write_bytes(content)
    job = external_job(world, tmp_path)
    code, _, err = run_cli(
        "score", str(job), "--run-dir", str(tmp_path / "run"), "--responses", str(responses)
    )
    one_line_error(code, err, [str(responses), *words])
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_score_checks_its_output_before_any_work(world, tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"prompt": "hi", "response": "the cat ."}) + "\n")
    (tmp_path / "a_file").write_text("x")
    job = external_job(world, tmp_path)
    for target, words in [
        (tmp_path, ["is a directory"]),
        (tmp_path / "a_file" / "out.parquet", ["under the file"]),
    ]:
        code, _, err = run_cli(
            "score",
            str(job),
            "--run-dir",
            str(tmp_path / "run"),
            "--responses",
            str(responses),
            "-o",
            str(target),
        )
        one_line_error(code, err, ["-o", *words])
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- rto traces and rto report


def broken_trace(directory: Path, kind: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = trace_path(directory / "traces", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [sample_row(1, i) for i in range(2)]
    if kind == "v1_missing_column":
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "reward_kl"} for r in rows])
        table = table.replace_schema_metadata({b"rto.trace_schema_version": b"1"})
        pq.write_table(table, path)
    elif kind == "v2":
        table = pa.Table.from_pylist(rows).replace_schema_metadata({b"rto.trace_schema_version": b"2"})
        pq.write_table(table, path)
    elif kind == "wrong_type":  # written by another tool: doubles are fine, strings for rewards are not
        table = pa.Table.from_pylist([{**r, "reward": [str(x) for x in r["reward"]]} for r in rows])
        pq.write_table(table.replace_schema_metadata({b"rto.trace_schema_version": b"1"}), path)
    elif kind == "doubles":  # another writer's widths and list names: readable
        table = pa.Table.from_pylist(rows).replace_schema_metadata({b"rto.trace_schema_version": b"1"})
        pq.write_table(table, path)
    elif kind == "not_parquet":
        path.write_bytes(b"PAR1 not really")
    return path


TRACE_FILES = [
    ("v1_missing_column", ["lacks the columns", "reward_kl"]),
    ("v2", ["schema version 2", "expected 1"]),
    ("wrong_type", ["column 'reward'"]),
    ("not_parquet", ["not a readable Parquet file"]),
]


@pytest.mark.parametrize("kind,words", TRACE_FILES, ids=[c[0] for c in TRACE_FILES])
@pytest.mark.parametrize("command", ["traces", "report"])
def test_trace_readers_refuse_files_they_cannot_read(tmp_path, kind, words, command):
    run = tmp_path / "run"
    broken_trace(run, kind)
    (run / "config.yaml").write_text("stages: [ppo]\n")
    args = (
        ["traces", str(run)] if command == "traces" else ["report", str(run), "-o", str(tmp_path / "r.html")]
    )
    code, _, err = run_cli(*args)
    one_line_error(code, err, ["step-000001.parquet", *words])


def test_trace_files_from_another_writer_are_read(tmp_path):
    run = tmp_path / "run"
    broken_trace(run, "doubles")
    code, out, err = run_cli("traces", str(run))
    assert code == 0, err
    assert "step 1 · 2 samples" in out


def test_traces_bad_arguments(world):
    run = world["run"]
    for args, words in [
        (["--step", "999"], ["--step", "no traces for step 999"]),
        (["--sample", "77"], ["--sample", "no sample 77"]),
        (["--color", "nope"], ["--color"]),
        (["--sort", "nope"], ["--sort"]),
    ]:
        code, _, err = run_cli("traces", str(run), *args)
        one_line_error(code, err, words)
    code, _, err = run_cli("traces", str(world["root"] / "nothing-here"))
    one_line_error(code, err, ["nothing-here"])


def test_report_reads_damaged_metrics_and_summary(tmp_path):
    """A metrics file with damaged or non-UTF-8 lines and a corrupt summary: the page is made from
    what is readable (damaged lines are skipped like a line cut by a crash)."""
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'\n\xff\xfe\x00 garbage\n[1, 2]\n"a string"\n')
    (run / "summary.json").write_text("{broken")
    code, out, err = run_cli("report", str(run), "-o", str(tmp_path / "r.html"))
    assert code == 0, err
    assert "step 3" in (tmp_path / "r.html").read_text()


def test_report_output_is_checked_before_any_work(world, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for target, words in [
        (tmp_path, ["is a directory"]),
        (tmp_path / "a_file" / "r.html", ["under the file"]),
    ]:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        code, _, err = run_cli("report", str(world["run"]), "-o", str(target))
        one_line_error(code, err, ["-o", *words])
        assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------- rto submit and rto jobs

SUBMIT = [
    (["--address", "http://127.0.0.1:99999"], ["--address", "outside 1-65535"]),
    (["--address", "ftp://127.0.0.1:8265"], ["--address", "http://HOST:PORT"]),
    (["--env", "NOEQUALS"], ["--env", "KEY=VALUE"]),
    (["--env", "WANDB_API_KEY=abc"], ["--env", "--secret-file"]),
    (["--secret-file", "HF_TOKEN"], ["--secret-file", "NAME=PATH"]),
    (["--secret-file", "HF_TOKEN=relative/path"], ["--secret-file", "absolute path"]),
    (["--run-dir", "relative/run"], ["--run-dir", "absolute path"]),
    (["--job-id", "a b"], ["--job-id", "[A-Za-z0-9._-]"]),
    (["--set", "ppo.steps=true"], ["ppo.steps"]),
]


@pytest.mark.parametrize("args,words", SUBMIT, ids=[" ".join(a) for a, _ in SUBMIT])
def test_submit(tmp_path, args, words):
    job = tmp_path / "job.yaml"
    job.write_text("stages: [sft]\n")
    extra = [] if "--address" in args else ["--address", "http://127.0.0.1:9"]
    code, _, err = run_cli("submit", str(job), *args, *extra)
    one_line_error(code, err, words)


@pytest.mark.parametrize(
    "args,words",
    [
        (["jobs", "status", "../../api/version"], ["job id"]),
        (["jobs", "logs", "x;y"], ["job id"]),
        (["jobs", "list", "--address", "http://127.0.0.1:0"], ["--address"]),
        (["jobs", "status", "a", "--address", "not a url"], ["--address"]),
    ],
)
def test_jobs(args, words):
    code, _, err = run_cli(*args, *([] if "--address" in args else ["--address", "http://127.0.0.1:9"]))
    one_line_error(code, err, words)


# ---------------------------------------------------------------- fuzz: corrupted real files


def corruptions(data: bytes, n: int, seed: int) -> list[bytes]:
    """`n` seeded corruptions of `data`: flipped bytes, cut tails, inserted and deleted runs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = bytearray(data)
        kind = rng.choice(["flip", "cut", "insert", "delete", "zero"])
        i = rng.randrange(len(b))
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "cut":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "delete":
            del b[i : i + rng.randint(1, 32)]
        else:
            b[i : i + 64] = bytes(min(64, len(b) - i))
        out.append(bytes(b))
    return out


def assert_clean_exit(code: int, err: str) -> None:
    assert code in (0, 2), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_fuzz_corrupted_job_files(tmp_path):
    for i, blob in enumerate(corruptions(QUICKSTART.read_bytes(), 60, seed=1)):
        path = tmp_path / f"job-{i}.yaml"
        path.write_bytes(blob)
        assert_clean_exit(*run_cli("validate", str(path))[::2])


def test_fuzz_corrupted_trace_metrics_and_summary_files(tmp_path):
    source = make_run(tmp_path / "source")
    trace = trace_path(source / "traces", 3)
    files = {"trace": trace, "metrics": source / "metrics.jsonl", "summary": source / "summary.json"}
    for name, original in files.items():
        for i, blob in enumerate(corruptions(original.read_bytes(), 8, seed=sum(map(ord, name)))):
            run = tmp_path / f"{name}-{i}"
            shutil.copytree(source, run)
            (run / original.relative_to(source)).write_bytes(blob)
            assert_clean_exit(*run_cli("traces", str(run))[::2])
            assert_clean_exit(*run_cli("traces", str(run), "--step", "3", "--sample", "1")[::2])
            assert_clean_exit(*run_cli("report", str(run), "-o", str(tmp_path / f"{name}-{i}.html"))[::2])


def test_fuzz_corrupted_data_files(world, tmp_path):
    """Corrupted SFT data through `rto run`: refused at preparation, or (where the damage leaves a
    valid file) trained on for one step."""
    original = Path(world["data"]["sft"]).read_bytes()
    for i, blob in enumerate(corruptions(original, 6, seed=7)):
        data = tmp_path / f"sft-{i}.jsonl"
        data.write_bytes(blob)
        job = external_job(world, tmp_path / f"job-{i}", data={"sft": {"path": str(data)}})
        assert_clean_exit(*run_cli("run", str(job), "--run-dir", str(tmp_path / f"run-{i}"))[::2])


def test_run_refuses_model_folders_that_hold_no_model(world, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    job = external_job(world, tmp_path, policy={"path": str(empty)})
    code, _, err = run_cli("run", str(job), "--run-dir", str(tmp_path / "run"))
    one_line_error(code, err, ["policy.path", str(empty), "holds no model"])
