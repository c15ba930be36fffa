"""Ray actor groups: N actors of one worker class, "run on all" and "run on a slice of the batch".

Ray decides where workers run (placement groups, fractional CPU/GPU shares); the workers decide what
they compute. Modelled on OpenRLHF's actor-group layer.

Colocation: create one placement group with :func:`create_placement_group` and pass it to several
:class:`ActorGroup` s; actor ``i`` of each group is placed in bundle ``i`` (mod the bundle count) and
takes only its own fractional share of that bundle (``Resources(num_cpus=0.25, num_gpus=0.5)``).
Without a shared placement group each group creates (and owns) its own, one bundle per actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rto.errors import ClusterError
from rto.ray_env import use_token_auth

# Environment every worker process gets. One torch/OpenMP thread per actor: several actors share a
# few cores on a laptop, and oversubscribed thread pools are slower than one thread each.
DEFAULT_WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no per-actor "Loading weights" bars in the driver's log
    "TRANSFORMERS_VERBOSITY": "error",
}


def init_ray(address: str | None = None, num_cpus: float | None = None, **kwargs: Any) -> None:
    """Start a new Ray instance in-process (``address=None``: laptop, dashboard off; never a cluster
    found through ``RAY_ADDRESS`` or an earlier ``ray start``) or connect to a
    running cluster (``address="auto"`` or ``"ray://host:10001"`` / ``"host:6379"``).

    ``num_cpus`` only applies to an in-process start (a cluster's resources are its own); it may be a
    whole number of logical CPUs larger than the machine's cores when workers use fractional shares.
    Extra keyword arguments go to ``ray.init``. Does nothing if Ray is already initialised.
    """
    if ray.is_initialized():
        return
    from rto.progress import route_library_logs, verbose  # deferred: rto.progress is base, imported light

    kwargs.setdefault("log_to_driver", verbose())  # workers' output stays in Ray's logs unless --verbose
    route_library_logs()
    if address is None:
        kwargs.setdefault("include_dashboard", False)
        if num_cpus is not None:
            kwargs["num_cpus"] = int(num_cpus) if float(num_cpus).is_integer() else num_cpus
        # "local": a new instance even when RAY_ADDRESS is set or an earlier `ray start` left its
        # address in <tmp>/ray/ray_current_cluster (a bare ray.init() would join that cluster)
        with loopback_only():
            ray.init(address="local", **kwargs)
    else:
        use_token_auth()  # a head with a token runs in token mode; its drivers must too
        ray.init(address=address, **kwargs)


@contextlib.contextmanager
def loopback_only():
    """An in-process Ray started inside binds its servers (GCS, raylet, object manager) to
    127.0.0.1 instead of the machine's network address. Ray turns a ``_node_ip_address`` of
    127.0.0.1 into the routable address unless its cluster mode is off (as on macOS and Windows):
    that switch is read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, by the driver at import and by the
    processes it starts, so both are set for the start and restored after it."""
    from ray._private import ray_constants

    name, before = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, ray_constants.ENABLE_RAY_CLUSTER
    saved = os.environ.get(name)
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one actor of a group asks for. Fractions are allowed (several actors share a bundle).
    ``custom``: custom Ray resources (``ray start --resources``), which pin actors to the nodes
    that have them."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom: tuple[tuple[str, float], ...] = ()

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus, **dict(self.custom)}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        return bundle


def create_placement_group(
    num_bundles: int, bundle: dict[str, float], strategy: str = "PACK", timeout_s: float = 120.0,
    name: str = "placement group",
) -> PlacementGroup:  # fmt: skip
    """Reserve ``num_bundles`` bundles such as ``{"CPU": 1, "GPU": 1}`` and wait until they are ready.

    Pass the result to several :class:`ActorGroup` s to colocate them (see the module docstring).
    ``strategy`` is Ray's: ``PACK`` (default), ``SPREAD``, ``STRICT_PACK``, ``STRICT_SPREAD``.
    If the cluster has no room for it within ``timeout_s``, the request is withdrawn and a
    :class:`rto.errors.ClusterError` names ``name``, the bundles and what the cluster has free.
    """
    bundles = [dict(bundle) for _ in range(num_bundles)]
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        free = {k: round(v, 2) for k, v in sorted(ray.available_resources().items()) if "node:" not in k
                and k not in ("memory", "object_store_memory")}  # fmt: skip
        raise ClusterError(
            f"could not place the {name} ({num_bundles} × {bundle}, {strategy}) within {timeout_s:g} s; "
            f"the cluster has {free or 'nothing'} free"
        ) from None
    return group


class ActorGroup:
    """``num_actors`` Ray actors of ``worker_cls`` (a :class:`rto.distributed.workers.Worker`).

    Each actor is built as ``worker_cls(**worker_kwargs, rank=i, world_size=num_actors)``; then the
    group runs the rendezvous: rank 0 picks its node address and a free port, and every rank's
    ``setup(master_addr, master_port)`` is called (trainable workers build their DeepSpeed engine
    there; frozen and rollout workers only record it).

    Args:
        worker_cls: the plain Python worker class; the group makes it a Ray actor.
        num_actors: number of ranks.
        worker_kwargs: constructor arguments shared by all ranks.
        resources: what each actor asks for (fractional CPUs/GPUs allowed).
        placement_group: a shared placement group (colocation); ``None`` creates one bundle per actor
            sized ``resources``, owned and removed by this group.
        bundle_offset: actor ``i`` goes to bundle ``(bundle_offset + i) % num_bundles``.
        env_vars: extra environment variables for the worker processes.
        name: prefix of the Ray actor names (for the dashboard and logs).
        strategy: the placement strategy of the group's own placement group (not a shared one).
        ready_timeout_s: how long to wait for room for the group's own placement group.

    After construction, ``placement`` says where each rank runs (``Worker.where``).
    """

    def __init__(
        self,
        worker_cls: type,
        num_actors: int,
        *,
        worker_kwargs: dict[str, Any] | None = None,
        resources: Resources = Resources(),
        placement_group: PlacementGroup | None = None,
        bundle_offset: int = 0,
        env_vars: dict[str, str] | None = None,
        name: str | None = None,
        strategy: str = "PACK",
        ready_timeout_s: float = 120.0,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.worker_cls = worker_cls
        self.num_actors = num_actors
        self.name = name or worker_cls.__name__
        self._owns_placement_group = placement_group is None
        self.actors = []
        if placement_group is None:
            placement_group = create_placement_group(
                num_actors, resources.bundle(), strategy, ready_timeout_s, name=f"'{self.name}' group"
            )
        self.placement_group = placement_group
        num_bundles = len(placement_group.bundle_specs)
        remote_cls = ray.remote(worker_cls)
        env = {**DEFAULT_WORKER_ENV, **(env_vars or {})}
        for rank in range(num_actors):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=placement_group,
                placement_group_bundle_index=(bundle_offset + rank) % num_bundles,
            )
            actor = remote_cls.options(
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus,
                resources=dict(resources.custom) or None,
                scheduling_strategy=strategy,
                runtime_env={"env_vars": env},
                name=f"{self.name}-{rank}-{id(self):x}",
            ).remote(**(worker_kwargs or {}), rank=rank, world_size=num_actors)
            self.actors.append(actor)
        # Rendezvous: rank 0 picks a free port on its node; loopback when the group is on one node.
        master_addr, master_port = ray.get(self.actors[0].master_address.remote())
        self.placement: list[dict[str, Any]] = self.run_all("where")
        if len({p["node_id"] for p in self.placement}) == 1:
            master_addr = "127.0.0.1"
        self.run_all("setup", master_addr, master_port)

    def actor_ids(self) -> dict[str, int]:
        """Each actor's Ray id (hex) → its rank."""
        return {actor._actor_id.hex(): rank for rank, actor in enumerate(self.actors)}

    def describe(self) -> str:
        """``name: N on node 1a2b3c4d (10.0.0.5)[, ...]``: where the group runs."""
        nodes: dict[tuple, int] = {}
        for p in self.placement:
            key = ((p["node_id"] or "local")[:8], p["ip"])
            nodes[key] = nodes.get(key, 0) + 1
        where = ", ".join(f"{count} on node {node} ({ip})" for (node, ip), count in nodes.items())
        return f"{self.name}: {where}"

    def _remote(self, actor, method: str):
        """``actor.method.remote`` (a colocated member's view routes it into the member)."""
        return getattr(actor, method).remote

    # -- run on all ranks -------------------------------------------------------------------------
    def async_run_all(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call ``method(*args, **kwargs)`` on every rank; return one ObjectRef per rank."""
        return [self._remote(actor, method)(*args, **kwargs) for actor in self.actors]

    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call ``method(*args, **kwargs)`` on every rank and wait; results in rank order."""
        return ray.get(self.async_run_all(method, *args, **kwargs))

    def run_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on one rank only and wait (never use it for collective methods)."""
        return ray.get(self._remote(self.actors[rank], method)(*args, **kwargs))

    # -- run on a slice of the batch --------------------------------------------------------------
    def async_run_sharded(self, method: str, batch: dict[str, Any], **kwargs: Any) -> list[ray.ObjectRef]:
        """Split every tensor of ``batch`` along dim 0 into ``num_actors`` contiguous slices (sizes
        differ by at most one; non-tensor values go to every rank unchanged) and call
        ``method(slice, **kwargs)`` on each rank. Ranks whose slice would be empty are not called, so
        collective methods (``train_step``) need at least ``num_actors`` rows.
        Gather with :func:`concat_results` (``concat_results(ray.get(refs))``).
        """
        shards = split_batch(batch, self.num_actors)
        return [
            self._remote(actor, method)(shard, **kwargs)
            for actor, shard in zip(self.actors, shards, strict=False)
        ]

    def async_run_even(self, method: str, batch: dict[str, Any], **kwargs: Any) -> PendingShards:
        """:meth:`async_run_sharded` with every rank given the same number of rows: the batch is
        padded to a multiple of the rank count by repeating its last row, and the extra rows are
        dropped again by :meth:`PendingShards.get`. Collective methods need it: under ZeRO-3
        every rank must make the same forward calls (parameters are gathered in each of them),
        or the group deadlocks."""
        rows = _batch_rows(batch)
        padded = -(-rows // self.num_actors) * self.num_actors
        if padded != rows:
            repeat = torch.cat([torch.arange(rows), torch.full((padded - rows,), rows - 1)])
            batch = {k: v[repeat] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return PendingShards(self.async_run_sharded(method, batch, **kwargs), rows)

    def run_sharded(self, method: str, batch: dict[str, Any], **kwargs: Any) -> Any:
        """:meth:`async_run_sharded` and wait; per-rank results are concatenated in batch order
        (tensors along dim 0, dicts of tensors key by key, anything else returned as a list)."""
        return concat_results(ray.get(self.async_run_sharded(method, batch, **kwargs)))

    def shutdown(self) -> None:
        """Kill the actors and remove the placement group if this group created it (also after
        some of them were lost with their node)."""
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - an actor lost with its node cannot be killed again
                pass
        self.actors = []
        if self._owns_placement_group:
            try:
                remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001 - already gone with the cluster
                pass
            self._owns_placement_group = False


@dataclasses.dataclass
class PendingShards:
    """The per-rank results of :meth:`ActorGroup.async_run_even`; ``get()`` waits, concatenates
    them in batch order and drops the padding rows."""

    refs: list[ray.ObjectRef]
    rows: int

    def get(self) -> Any:
        out = concat_results(ray.get(self.refs))
        if isinstance(out, torch.Tensor):
            return out[: self.rows]
        if isinstance(out, dict):
            return {k: v[: self.rows] if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out


def _batch_rows(batch: dict[str, Any]) -> int:
    sizes = {value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors must share one non-empty dim 0, got sizes {sorted(sizes)}")
    return sizes.pop()


def split_batch(batch: dict[str, Any], num_shards: int) -> list[dict[str, Any]]:
    """Split the tensors of ``batch`` along dim 0 into at most ``num_shards`` non-empty slices."""
    batch_size = _batch_rows(batch)
    num_shards = max(1, min(num_shards, batch_size))
    pieces = {
        key: torch.tensor_split(value, num_shards) if isinstance(value, torch.Tensor) else None
        for key, value in batch.items()
    }
    return [
        {key: (pieces[key][i] if pieces[key] is not None else value) for key, value in batch.items()}
        for i in range(num_shards)
    ]


def concat_results(results: Sequence[Any]) -> Any:
    """Concatenate per-rank results: tensors along dim 0, dicts of tensors key by key (non-tensor
    entries are taken from rank 0); any other type is returned unchanged as a list."""
    if results and all(isinstance(r, torch.Tensor) for r in results):
        return torch.cat(list(results), dim=0)
    if results and all(isinstance(r, dict) for r in results):
        first = results[0]
        if any(isinstance(v, torch.Tensor) for v in first.values()):
            return {
                key: torch.cat([r[key] for r in results], dim=0) if isinstance(value, torch.Tensor) else value
                for key, value in first.items()
            }
    return list(results)
