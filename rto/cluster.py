"""Ray nodes that rto starts and stops itself: ``rto cluster up | join | status | down``, and the
multi-node loopback clusters of the tests and benchmarks (:class:`LocalCluster`).

Each node is one ``ray start --block`` process started in a session of its own. Its GCS (on the
head), raylet, agents and every worker process the raylet spawns stay in that session, so a node is
stopped, or killed like a lost machine, by signalling exactly the processes of its session, found
by their session id. Never ``ray stop``: it stops every Ray on the machine.

Token authentication (Ray 2.60): a head started while a token is available (``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) runs in token mode, and every node and driver
that joins it must run with ``RAY_AUTH_MODE=token`` too, or it fails with ``AuthenticationError``.
:func:`ray_env` sets that mode whenever a token is available, for the head, the nodes and drivers
alike (``rto.ray_env.use_token_auth`` does it for ``rto run``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from rto.errors import ClusterError, UserError
from rto.ray_env import use_token_auth

# Every port a node listens on besides the head's own three; several nodes on one machine need
# distinct ones, so each node gets free ports for all of them.
NODE_PORT_OPTIONS = (
    "--node-manager-port", "--object-manager-port", "--metrics-export-port",
    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
)  # fmt: skip
HEAD_PORT_OPTIONS = ("--ray-client-server-port",)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports on ``host`` (all held open at once, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ray_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``ray start`` and for drivers: this Python's ``bin`` first on the PATH
    (a job runs with the ``python`` found there), usage stats off, and ``RAY_AUTH_MODE=token`` when
    a token is available (unless the caller set a mode)."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_token_auth(env)
    return env


def session_pids(session_id: int) -> list[int]:
    """Every process whose session is ``session_id`` (a node's ``ray start`` and all it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == session_id:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            pass
    return pids


@dataclasses.dataclass
class Node:
    """One node rto started: its ``ray start --block`` process (the leader of the node's session)."""

    role: str  # "head" or "worker"
    pid: int
    temp_dir: str
    log: str
    gcs_address: str  # host:port of the cluster's GCS (the head's)
    dashboard: str | None = None  # http://host:port, on the head when it runs a dashboard
    num_cpus: float | None = None
    resources: dict[str, float] = dataclasses.field(default_factory=dict)

    def processes(self) -> list[int]:
        return session_pids(self.pid)

    def worker_pids(self, title: str) -> list[int]:
        """The node's processes whose Ray process title starts with ``title``
        (``ray::RolloutWorker``: the actor processes of that class)."""
        pids = []
        for pid in self.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(title):
                pids.append(pid)
        return sorted(pids)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return _state(self.pid) not in ("Z", "X", None)

    def kill(self) -> int:
        """SIGKILL every process of the node at once, as when its machine is lost; returns how many."""
        killed: set[int] = set()
        for _ in range(20):  # again, for any process forked while the first SIGKILLs were sent
            pids = [pid for pid in self.processes() if _state(pid) not in ("Z", "X", None)]
            if not pids:
                break
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            killed.update(pids)
            _reap(self.pid)
            time.sleep(0.1)
        return len(killed)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to ``ray start --block`` (it stops the daemons it started), then SIGKILL to
        whatever is left of the node's session."""
        if self.alive():
            _signal(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.alive() and time.monotonic() < deadline:
                _reap(self.pid)
                time.sleep(0.2)
        for _ in range(20):
            leftovers = self.processes()
            if not leftovers:
                break
            for pid in leftovers:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.25)
        _reap(self.pid)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect the exit status of a node we started in this process (no zombie left behind)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _start(command: list[str], temp_dir: str, log_name: str, env: dict[str, str]) -> int:
    log = Path(temp_dir) / log_name
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )  # fmt: skip
    return process.pid


def _new_temp_dir(parent: str | None) -> str:
    # Ray's unix socket paths live under the temp dir and must stay short: /tmp/rto-XXXXXXXX
    return tempfile.mkdtemp(prefix="rto-", dir=parent or "/tmp")


def _ray() -> str:
    return str(Path(sys.executable).parent / "ray")


def start_head(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    dashboard_port: int | None = None,
    dashboard_host: str = "127.0.0.1",
    num_cpus: float = 0,
    resources: dict[str, float] | None = None,
    include_dashboard: bool = True,
    temp_parent: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
) -> Node:
    """Start a head node and wait until its GCS (and dashboard) answer. ``port=None``: free ports."""
    port = port or free_ports(1)[0]
    dashboard_port = dashboard_port or free_ports(1)[0]
    temp_dir = _new_temp_dir(temp_parent)
    ports = dict(
        zip(NODE_PORT_OPTIONS + HEAD_PORT_OPTIONS, free_ports(len(NODE_PORT_OPTIONS) + 1), strict=True)
    )
    command = [
        _ray(), "start", "--head", "--block", "--node-ip-address", host, "--port", str(port),
        "--num-cpus", _number(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats",
        "--include-dashboard", "true" if include_dashboard else "false",
        *(["--dashboard-host", dashboard_host, "--dashboard-port", str(dashboard_port)] if include_dashboard else []),
        *(["--resources", json.dumps(resources)] if resources else []),
        *[str(x) for option, value in ports.items() for x in (option, value)],
    ]  # fmt: skip
    pid = _start(command, temp_dir, "head.log", ray_env(env))
    node = Node(
        role="head", pid=pid, temp_dir=temp_dir, log=str(Path(temp_dir) / "head.log"),
        gcs_address=f"{host}:{port}", dashboard=f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{dashboard_port}"
        if include_dashboard else None, num_cpus=num_cpus, resources=dict(resources or {}),
    )  # fmt: skip
    _wait_until_up(node, timeout_s)
    return node


def start_worker(
    gcs_address: str,
    *,
    host: str = "127.0.0.1",
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    temp_parent: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> Node:
    """Start a node that joins the cluster whose GCS is ``gcs_address``; wait until it runs."""
    temp_dir = _new_temp_dir(temp_parent)
    ports = dict(zip(NODE_PORT_OPTIONS, free_ports(len(NODE_PORT_OPTIONS)), strict=True))
    command = [
        _ray(), "start", "--block", "--address", gcs_address, "--node-ip-address", host,
        "--num-cpus", _number(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats",
        *(["--resources", json.dumps(resources)] if resources else []),
        *[str(x) for option, value in ports.items() for x in (option, value)],
    ]  # fmt: skip
    pid = _start(command, temp_dir, "node.log", ray_env(env))
    node = Node(
        role="worker", pid=pid, temp_dir=temp_dir, log=str(Path(temp_dir) / "node.log"),
        gcs_address=gcs_address, num_cpus=num_cpus, resources=dict(resources or {}),
    )  # fmt: skip
    _wait_until_up(node, timeout_s)
    return node


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _wait_until_up(node: Node, timeout_s: float) -> None:
    """Until ``ray start`` says the runtime started (and the dashboard answers, on a head)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = Path(node.log).read_text(errors="replace") if Path(node.log).exists() else ""
        started = "Ray runtime started" in text
        if started and (node.dashboard is None or dashboard_answers(node.dashboard)):
            return
        if not node.alive():
            tail = " | ".join(line.strip() for line in text.splitlines()[-3:])
            node.stop()
            raise RuntimeError(f"the Ray {node.role} node exited while starting (log {node.log}): {tail}")
        if time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(
                f"the Ray {node.role} node did not start within {timeout_s:.0f} s (log {node.log})"
            )
        time.sleep(0.5)


def dashboard_answers(address: str) -> bool:
    """The dashboard at ``address`` is up (401: up, with token authentication)."""
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
        return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False


class LocalCluster:
    """A multi-node Ray cluster on this machine: one head and any number of worker nodes, each its
    own ``ray start --block`` session with its own temp dir and ports, all on loopback.

        with LocalCluster(head_cpus=0) as cluster:
            a = cluster.add_node(num_cpus=2, resources={"trainer": 10})
            ...                                   # resources.ray_address: cluster.address
            cluster.kill(a)                        # the machine is lost
            cluster.add_node(num_cpus=2, resources={"trainer": 10})   # and replaced
    """

    def __init__(self, head_cpus: float = 0, head_resources: dict[str, float] | None = None,
                 include_dashboard: bool = True, env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.env = env
        self.head = start_head(
            num_cpus=head_cpus, resources=head_resources, include_dashboard=include_dashboard, env=env
        )
        self.workers: list[Node] = []

    @property
    def address(self) -> str:
        """The GCS address, for ``ray.init(address=...)`` / ``resources.ray_address``."""
        return self.head.gcs_address

    @property
    def dashboard(self) -> str | None:
        return self.head.dashboard

    def add_node(self, num_cpus: float = 1, resources: dict[str, float] | None = None) -> Node:
        node = start_worker(self.address, num_cpus=num_cpus, resources=resources, env=self.env)
        self.workers.append(node)
        return node

    def kill(self, node: Node) -> int:
        return node.kill()

    def node_with(self, resource: str) -> Node:
        """The one live worker node that offers the custom ``resource``."""
        (node,) = [n for n in self.workers if resource in n.resources and n.alive()]
        return node

    def nodes(self) -> Iterator[Node]:
        yield from self.workers
        yield self.head

    def shutdown(self) -> None:
        for node in self.nodes():
            node.stop()
        for node in self.nodes():
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


# ---------------------------------------------------------------- `rto cluster` state


def state_file() -> Path:
    """Where `rto cluster` records the nodes it started: $RTO_CLUSTER_STATE or ~/.rto/cluster.json."""
    return Path(os.environ.get("RTO_CLUSTER_STATE") or Path.home() / ".rto" / "cluster.json")


def recorded_nodes() -> list[Node]:
    path = state_file()
    if not path.exists():
        return []
    try:
        return [Node(**entry) for entry in json.loads(path.read_text())]
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(
            f"unreadable ({type(exc).__name__}); delete it once its nodes are stopped", source=str(path)
        ) from None


def record_nodes(nodes: list[Node]) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps([dataclasses.asdict(n) for n in nodes], indent=1))
    tmp.replace(path)


def parse_resources(text: str | None, field: str = "--resources") -> dict[str, float]:
    """``'{"trainer": 4}'`` → custom resources; anything else is a `UserError` naming the flag."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(
            f"expected a JSON object such as '{{\"trainer\": 4}}', got '{text}'", field=field
        ) from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for k, v in value.items()
    ):
        raise UserError(
            f"expected names with positive amounts such as '{{\"trainer\": 4}}', got '{text}'", field=field
        )
    if set(value) & {"CPU", "GPU", "memory", "object_store_memory"}:
        raise UserError(
            "CPU, GPU and memory are not custom resources: use --num-cpus / --num-gpus", field=field
        )
    return {k: float(v) for k, v in value.items()}


def check_address(address: str) -> str:
    """``HOST:PORT`` of a head's GCS."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"expected HOST:PORT of the head (e.g. 127.0.0.1:6379), got '{address}'", field="ADDRESS"
        )
    return address


def cluster_up(*, port: int, dashboard_port: int, num_cpus: float, resources: dict[str, float],
               host: str, dashboard_host: str) -> Node:  # fmt: skip
    """`rto cluster up`: start a head node (one per state file) and record it."""
    nodes = [n for n in recorded_nodes() if n.alive()]
    if any(n.role == "head" for n in nodes):
        head = next(n for n in nodes if n.role == "head")
        raise UserError(
            f"a head started by rto is running (pid {head.pid}, {head.gcs_address}); `rto cluster down` first",
            source=str(state_file()),
        )
    for flag, value in (("--port", port), ("--dashboard-port", dashboard_port)):
        if not _port_free(host if host != "0.0.0.0" else "127.0.0.1", value):
            raise UserError(f"port {value} is taken on {host}", field=flag)
    try:
        head = start_head(host=host, port=port, dashboard_port=dashboard_port, dashboard_host=dashboard_host,
                          num_cpus=num_cpus, resources=resources)  # fmt: skip
    except RuntimeError as exc:
        raise ClusterError(str(exc)) from None
    record_nodes([*nodes, head])
    return head


def cluster_join(address: str, *, num_cpus: float, resources: dict[str, float], host: str) -> Node:
    """`rto cluster join`: start a worker node that joins the head at ``address`` and record it."""
    host_part, _, port = check_address(address).rpartition(":")
    if _port_free(host_part, int(port)) and host_part in ("127.0.0.1", "localhost"):
        raise UserError(f"no Ray head listens at {address}", field="ADDRESS")
    try:
        node = start_worker(address, host=host, num_cpus=num_cpus, resources=resources)
    except RuntimeError as exc:
        raise ClusterError(str(exc)) from None
    record_nodes([*[n for n in recorded_nodes() if n.alive()], node])
    return node


def cluster_down() -> list[Node]:
    """`rto cluster down`: stop every node rto recorded (worker nodes first), by their sessions."""
    nodes = recorded_nodes()
    for node in sorted(nodes, key=lambda n: n.role == "head"):
        node.stop()
        shutil.rmtree(node.temp_dir, ignore_errors=True)
    if state_file().exists():
        state_file().unlink()
    return nodes


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
