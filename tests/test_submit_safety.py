"""What `rto submit` sends, and what it runs: an allow-list of files (never a dotfile or key
material), job ids that cannot inject a command or climb out of the runs folder, an entrypoint in
which every word is quoted, and secrets passed by reference. None of these tests needs a cluster:
each is refused, or listed with --dry-run, before anything connects."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rto import jobs

REPO = Path(jobs.__file__).resolve().parent.parent

SECRETS = [
    ".env",
    ".env.local",
    ".ray/auth_token",
    ".cache/huggingface/token",
    "hf_token",
    ".aws/credentials",
    ".ssh/id_rsa",
    "id_rsa",
    "id_ed25519",
    "deploy.pem",
    "configs/.env",
    "configs/server.key",
    "rto/.secret.yaml",
    "data/credentials.json",
]


def unused_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def make_checkout(root: Path) -> Path:
    """A copy of this checkout's code and configs, with every kind of secret planted in it."""
    for package in (*jobs.PACKAGES, "configs"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    for name in SECRETS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("s3cr3t-value\n")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "prompts.jsonl").write_text('{"prompt": "describe the cat"}\n')
    (root / "data" / "unrelated.jsonl").write_text('{"prompt": "not named by the job"}\n')
    (root / "notes.txt").write_text("not code\n")
    return root


def test_the_package_is_an_allow_list_without_dotfiles_or_key_material(tmp_path):
    root = make_checkout(tmp_path / "checkout")
    job = root / "configs" / "job.yaml"
    job.write_text(yaml.safe_dump({"stages": ["ppo"], "data": {"prompts": {"path": "data/prompts.jsonl"}}}))
    from rto.config import load_config

    cwd = Path.cwd()
    os.chdir(root)  # the job names its data relative to where `rto submit` runs
    try:
        cfg = load_config(job)
        files = jobs.job_files(root, cfg)
    finally:
        os.chdir(cwd)
    sent = {str(relative) for _, relative in files}
    for name in SECRETS:
        assert name not in sent, name
    assert not [s for s in sent if any(part.startswith(".") for part in Path(s).parts)]
    assert "data/prompts.jsonl" in sent and "data/unrelated.jsonl" not in sent
    assert "notes.txt" not in sent and "pyproject.toml" not in sent
    assert {"rto/cli.py", "reward/compose.py", "prune/samplers.py", "pipelines/prepare.py"} <= sent
    assert "configs/quickstart.yaml" in sent
    assert all(source.is_file() and not source.is_symlink() for source, _ in files)


def test_dry_run_lists_exactly_what_would_be_sent(tmp_path):
    root = make_checkout(tmp_path / "checkout")
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copied checkout is the one that runs
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "submit", "configs/quickstart.yaml", "--dry-run", "--address", unused_address()],
        capture_output=True, text=True, cwd=root, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    listed = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert ".rto-job/quickstart.yaml" in listed and "rto/cli.py" in listed
    assert not [line for line in listed if "s3cr3t" in line or line in SECRETS]
    assert "nothing was sent" in result.stdout
    # the listing is the package: the same files, and nothing else, would be staged
    from rto.config import load_config

    cwd = Path.cwd()
    os.chdir(root)
    try:
        expected = {str(r) for _, r in jobs.job_files(root, load_config(root / "configs/quickstart.yaml"))}
    finally:
        os.chdir(cwd)
    assert set(listed) == expected | {".rto-job/quickstart.yaml"}


@pytest.mark.parametrize(
    "job_id",
    ["$(touch /tmp/rto-pwned)", "a;b", "..", "../x", "a/b", "x y", "-rf", "", "a" * 200],
)
def test_a_job_id_that_is_not_a_plain_name_is_refused_before_connecting(tmp_path, job_id):
    job = tmp_path / "job.yaml"
    job.write_text("stages: [sft]\n")
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "submit", str(job), "--job-id", job_id, "--address", unused_address()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert (
        "--job-id" in result.stderr and "[A-Za-z0-9._-]" in result.stderr and result.stderr.count("\n") == 1
    )
    assert not Path("/tmp/rto-pwned").exists()


@pytest.mark.parametrize("command", [["status"], ["logs"], ["stop"]])
def test_jobs_commands_refuse_an_id_that_would_reach_another_endpoint(command):
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "jobs", *command, "../../api/version", "--address", unused_address()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "job id" in result.stderr and "[A-Za-z0-9._-]" in result.stderr, result.stderr


def test_every_word_of_the_entrypoint_is_quoted(tmp_path):
    """The entrypoint is a shell command on the head: a run directory or config name holding shell
    syntax reaches `rto run` as one literal argument; only the default's $HOME is expanded."""
    marker = tmp_path / "pwned"
    run_dir = f"/shared/runs/a b/$(touch {marker})"
    command = jobs.entrypoint(".rto-job/my job.yaml", run_dir, "rto-x-1", resume=True)
    printed = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + command.removeprefix("python ")], capture_output=True, text=True
    ).stdout.splitlines()
    assert printed == ["-m", "rto.cli", "run", ".rto-job/my job.yaml", "--run-dir", run_dir, "--resume"]
    assert not marker.exists()
    default = jobs.entrypoint(".rto-job/q.yaml", None, "rto-q-2", resume=False)
    printed = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + default.removeprefix("python ")],
        capture_output=True, text=True, env={**os.environ, "HOME": "/home/ray"},
    ).stdout.splitlines()  # fmt: skip
    assert printed[-1] == "/home/ray/rto-runs/rto-q-2"


def test_generated_job_ids_are_plain_names():
    for name in ("quickstart", "my job (v2)", "ünïcode"):
        jobs.check_job_id(jobs.new_job_id(Path(f"{name}.yaml")))


def test_secret_looking_env_values_are_refused_and_secret_files_are_passed_by_path(tmp_path):
    """`--env HF_TOKEN=...` would be stored in the job's runtime env, which the job API returns to
    anyone who can list jobs: refused, pointing at --secret-file, which sends only a path on the
    cluster; `rto run --secret-file NAME=PATH` reads it there into the environment."""
    job = tmp_path / "job.yaml"
    job.write_text("stages: [sft]\n")
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "submit", str(job), "--env", "HF_TOKEN=hf_abc", "--address", unused_address()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--secret-file" in result.stderr and "hf_abc" not in result.stderr
    command = jobs.entrypoint(
        ".rto-job/q.yaml", "/runs/q", "q", resume=False, secret_files={"HF_TOKEN": "/s/hf"}
    )
    assert "--secret-file HF_TOKEN=/s/hf" in command
    secret = tmp_path / "token"
    secret.write_text("hf_from_file\n")
    from rto.cli import read_secret_files

    environ: dict[str, str] = {}
    read_secret_files([f"HF_TOKEN={secret}"], environ)
    assert environ == {"HF_TOKEN": "hf_from_file"}
    from rto.errors import UserError

    with pytest.raises(UserError, match="--secret-file"):
        read_secret_files([f"HF_TOKEN={tmp_path / 'missing'}"], environ)


def test_the_cluster_token_never_reaches_a_server_that_is_not_a_ray_dashboard(tmp_path):
    """A plain HTTP server on loopback, asked as if it were a cluster: it sees no token (HOME holds
    a ~/.ray/auth_token, as on a machine that talks to a real cluster), and the command says why."""
    import http.server
    import threading

    seen: list[dict] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(dict(self.headers))
            body = b'{"hello": "not ray"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("super-secret-cluster-token\n")
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for args in (["jobs", "list"], ["jobs", "status", "some-job"]):
            result = subprocess.run(
                [sys.executable, "-m", "rto.cli", *args, "--address", address],
                capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)},
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert (
                "does not answer as a Ray dashboard" in result.stderr and "no token was sent" in result.stderr
            )
    finally:
        server.shutdown()
    assert seen, "the probe reached the server"
    for headers in seen:
        assert not any("super-secret" in v for v in headers.values()), headers
        assert "Authorization" not in headers and "authorization" not in {k.lower() for k in headers}
