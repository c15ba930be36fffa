"""`rto cluster up | join | status | down` on loopback, with token authentication on (a token in
the home directory, as `ray.init` leaves one): the commands of docs/cluster.md, run as written,
start a head and a second node that joins it, a job API that answers, and stop both by their
process sessions. Plus the command's bad input."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rto.cluster import session_pids

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- verbatim: tests/test_cluster_cli.py -->"


def documented_commands() -> list[str]:
    text = (ROOT / "docs" / "cluster.md").read_text()
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def home(tmp_path):
    """A home with a Ray token (the head then runs in token mode) and rto's node records."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RTO_CLUSTER_STATE=str(tmp_path / "cluster.json"), OMP_NUM_THREADS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # `rto` is this venv's
    return env


def run(command: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_the_documented_commands_work_as_written(home, tmp_path):
    if port_taken(6379) or port_taken(8265):
        pytest.skip("ports 6379/8265 are in use on this machine (the documented defaults)")
    commands = documented_commands()
    assert [shlex.split(c)[:3] for c in commands] == [
        ["rto", "cluster", "up"], ["rto", "cluster", "join"], ["rto", "cluster", "status"],
        ["rto", "jobs", "list"], ["rto", "cluster", "down"],
    ]  # fmt: skip
    up, join, status, jobs, down = commands
    try:
        result = run(up, home)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (
            "token authentication on" in result.stdout and "rto cluster join 127.0.0.1:6379" in result.stdout
        )
        again = run(up, home)
        assert again.returncode == 2 and "a head started by rto is running" in again.stderr
        result = run(join, home)  # fails with AuthenticationError unless the node runs in token mode
        assert result.returncode == 0, result.stdout + result.stderr
        result = run(status, home)
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and all(" alive " in line for line in lines), result.stdout
        assert "{'trainer': 4.0}" in lines[1]
        result = run(jobs, home)
        assert result.returncode == 0 and result.stdout.startswith("job"), result.stderr
        nodes = json.loads(Path(home["RTO_CLUSTER_STATE"]).read_text())
    finally:
        result = run(down, home)
    assert result.returncode == 0 and result.stdout.count("stopped the") == 2, result.stderr
    time.sleep(1)
    assert not [pid for node in nodes for pid in session_pids(node["pid"])]
    assert "no nodes started by rto" in run(status, home).stdout


@pytest.mark.parametrize(
    "command,words",
    [
        ("rto cluster join nonsense", ["ADDRESS", "HOST:PORT"]),
        ("rto cluster join 127.0.0.1:1", ["no Ray head listens at 127.0.0.1:1"]),
        ("rto cluster up --resources '{bad'", ["--resources", "JSON object"]),
        ("rto cluster up --resources '{\"CPU\": 2}'", ["--resources", "not custom resources"]),
        ("rto cluster join 127.0.0.1:6379 --resources '{\"trainer\": -1}'", ["--resources", "positive"]),
        ("rto cluster up --num-cpus -1", ["--num-cpus"]),
    ],
)
def test_bad_input(home, command, words):
    result = run(command, home, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
