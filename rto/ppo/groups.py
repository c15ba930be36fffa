"""Builds the PPO actor groups (policy, critic, ref, dpo, rm, rollout) from the config."""

from __future__ import annotations

from dataclasses import dataclass

from ray.util.placement_group import PlacementGroup, remove_placement_group

from rto.distributed import (
    ActorGroup,
    EngineConfig,
    FrozenModelWorker,
    Resources,
    RolloutWorker,
    TrainableWorker,
    create_placement_group,
)
from rto.models import model_sampling_token_ids
from rto.ppo.config import GroupResources, PPOJob

GROUP_NAMES = ("policy", "critic", "ref", "dpo", "rm", "rollout")


@dataclass
class ModelPaths:
    policy: str
    critic: str
    ref: str
    dpo: str | None
    rm: str | None
    critic_kind: str = "token_classification"


@dataclass
class Groups:
    policy: ActorGroup
    critic: ActorGroup
    ref: ActorGroup
    rollout: ActorGroup
    dpo: ActorGroup | None = None
    rm: ActorGroup | None = None

    def all(self) -> list[ActorGroup]:
        return [
            g for g in (self.policy, self.critic, self.ref, self.dpo, self.rm, self.rollout) if g is not None
        ]

    def shutdown(self) -> None:
        for group in self.all():
            group.shutdown()

    def by_name(self) -> dict[str, ActorGroup]:
        return {group.name: group for group in self.all()}


TRAINABLE = ("policy", "critic")


def _resources(spec: GroupResources, gpu_share: float) -> Resources:
    return Resources(
        num_cpus=spec.cpus, num_gpus=spec.gpus or gpu_share, custom=tuple(sorted(spec.node_resources.items()))
    )


def default_gpu_share(cfg: PPOJob, wanted: set[str], device: str) -> float:
    """On CUDA with no `gpus` set anywhere, every actor gets an equal share of one GPU, so that
    `--set device=cuda` alone runs the whole job on one device."""
    res = cfg.resources
    if device != "cuda" or any(getattr(res, name).gpus for name in wanted):
        return 0.0
    actors = sum(getattr(res, name).ranks for name in wanted)
    return 1.0 / actors


class GroupBuilder:
    """Builds the PPO groups from the config, all at once or a few again after they were lost.

    Groups listed together in `resources.colocate` share one placement group; they are always
    (re)built together. Every placement waits up to ``ready_timeout_s`` for room."""

    def __init__(
        self, cfg: PPOJob, paths: ModelPaths, optimizer_steps: int, dtype: str, generate_fn=None,
        device: str = "cpu", ready_timeout_s: float = 120.0,
    ) -> None:  # fmt: skip
        self.cfg, self.paths, self.optimizer_steps, self.dtype = cfg, paths, optimizer_steps, dtype
        self.generate_fn, self.ready_timeout_s = generate_fn, ready_timeout_s
        self.wanted = (
            {"policy", "critic", "ref", "rollout"}
            | ({"dpo"} if paths.dpo else set())
            | ({"rm"} if paths.rm else set())
        )
        self.gpu_share = default_gpu_share(cfg, self.wanted, device)
        self.tokens = model_sampling_token_ids(paths.policy)  # the one EOS, the pad, what is never sampled
        self._shared: dict[str, PlacementGroup] = {}

    def colocated_with(self, names: set[str]) -> set[str]:
        """``names`` and every group that shares a placement group with one of them."""
        out = set(names)
        for members in self.cfg.resources.colocate:
            members = {m for m in members if m in self.wanted}
            if members & out:
                out |= members
        return out

    def build_all(self) -> Groups:
        groups = Groups(**{name: None for name in ("policy", "critic", "ref", "rollout")})
        try:
            for name in GROUP_NAMES:
                if name in self.wanted:
                    setattr(groups, name, self._build(name))
        except BaseException:
            groups.shutdown()
            self.release()
            raise
        return groups

    def rebuild(self, groups: Groups, names: set[str]) -> set[str]:
        """Shut down ``names`` (and the groups colocated with them) and build them again; returns
        the names rebuilt."""
        names = self.colocated_with(names)
        for name in names:
            old = getattr(groups, name)
            if old is not None:
                old.shutdown()
            setattr(groups, name, None)
        self.release(names)
        for name in GROUP_NAMES:
            if name in names:
                setattr(groups, name, self._build(name))
        return names

    def release(self, names: set[str] | None = None) -> None:
        """Remove the shared placement groups of ``names`` (default: all)."""
        for name in list(self._shared):
            if names is None or name in names:
                pg = self._shared.pop(name)
                if pg not in self._shared.values():
                    try:
                        remove_placement_group(pg)
                    except Exception:  # noqa: BLE001 - gone with the cluster
                        pass

    def _placement_group(self, name: str) -> PlacementGroup | None:
        res = self.cfg.resources
        for members in res.colocate:
            members = [m for m in members if m in self.wanted]
            if name not in members:
                continue
            if name not in self._shared:
                ranks = max(getattr(res, m).ranks for m in members)
                bundle: dict[str, float] = {}
                for m in members:
                    for key, value in _resources(getattr(res, m), self.gpu_share).bundle().items():
                        bundle[key] = bundle.get(key, 0) + value
                pg = create_placement_group(
                    ranks, bundle, "PACK", self.ready_timeout_s, name=f"colocated groups {'+'.join(members)}"
                )
                for m in members:
                    self._shared[m] = pg
            return self._shared[name]
        return None

    def _build(self, name: str) -> ActorGroup:
        spec: GroupResources = getattr(self.cfg.resources, name)
        cls, kwargs = self._worker(name)
        return ActorGroup(
            cls,
            spec.ranks,
            worker_kwargs=kwargs,
            resources=_resources(spec, self.gpu_share),
            placement_group=self._placement_group(name),
            name=name,
            strategy=spec.strategy,
            ready_timeout_s=self.ready_timeout_s,
        )

    def _engine(self, lr: float, ranks: int) -> EngineConfig:
        ppo = self.cfg.ppo
        return EngineConfig(
            zero_stage=ppo.zero_stage,
            bf16=self.dtype == "bfloat16",
            lr=lr,
            warmup_steps=ppo.warmup_steps,
            total_steps=self.optimizer_steps,
            gradient_accumulation_steps=ppo.accumulation_steps(ranks),
            micro_batch_size=ppo.micro_batch_size,
            grad_clip=ppo.max_grad_norm,
            seed=self.cfg.seed,
            scheduler="constant_with_warmup",
        )

    def _worker(self, name: str) -> tuple[type, dict]:
        ppo, res, paths, dtype = self.cfg.ppo, self.cfg.resources, self.paths, self.dtype
        if name == "policy":
            return TrainableWorker, dict(
                model_path=paths.policy, config=self._engine(ppo.actor_lr, res.policy.ranks)
            )
        if name == "critic":
            return TrainableWorker, dict(
                model_path=paths.critic, model_kind=paths.critic_kind,
                config=self._engine(ppo.critic_lr, res.critic.ranks),
            )  # fmt: skip
        if name in ("ref", "dpo"):
            path = paths.ref if name == "ref" else paths.dpo
            return FrozenModelWorker, dict(
                model_path=path, scoring_fn="rto.forward:response_logprobs", dtype=dtype
            )
        if name == "rm":
            return FrozenModelWorker, dict(
                model_path=paths.rm, model_kind="sequence_classification",
                scoring_fn="rto.forward:sequence_scores", dtype=dtype,
            )  # fmt: skip
        return RolloutWorker, dict(
            model_path=paths.policy, max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature,
            top_p=ppo.top_p, seed=self.cfg.seed, dtype=dtype, **self.tokens,
            **({"generate_fn": self.generate_fn} if self.generate_fn else {}),
        )  # fmt: skip


def build_groups(
    cfg: PPOJob, paths: ModelPaths, optimizer_steps: int, dtype: str, generate_fn=None, device: str = "cpu"
) -> Groups:
    """Create every group; groups listed together in `resources.colocate` share one placement group."""
    return GroupBuilder(cfg, paths, optimizer_steps, dtype, generate_fn, device).build_all()
