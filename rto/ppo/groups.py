"""Builds the PPO actor groups (policy, critic, ref, dpo, rm, rollout) from the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ray.util.placement_group import PlacementGroup, remove_placement_group

from rto.distributed import (
    ActorGroup,
    EngineConfig,
    FrozenModelWorker,
    Resources,
    RolloutWorker,
    TrainableScorer,
    TrainableWorker,
    create_placement_group,
    push_weights,
)
from rto.distributed.colocated import ColocatedWorker, MemberGroup
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
    """The PPO groups. ``critic`` is None for a critic-free estimator; with ``resources.colocate:
    all`` every group is a `MemberGroup` of the one ``colocated`` group, and the sampler shares
    the policy's weights."""

    policy: ActorGroup
    critic: ActorGroup | None
    ref: ActorGroup
    rollout: ActorGroup
    dpo: ActorGroup | None = None
    rm: ActorGroup | None = None
    colocated: ActorGroup | None = None
    dpo_trainable: bool = False  # the online refresh trains the DPO model (ppo.dpo_refresh)

    def trainable(self) -> list[ActorGroup]:
        """The groups with optimizer state: checkpointed, and rewound to a checkpoint when lost."""
        names = TRAINABLE + (("dpo",) if self.dpo_trainable else ())
        return [g for g in (getattr(self, name) for name in names) if g is not None]

    def trainable_names(self) -> set[str]:
        return {g.name for g in self.trainable()}

    def sync_weights(self) -> None:
        """Give the rollout samplers the policy's new weights (nothing to do when they share them)."""
        if self.colocated is None:
            push_weights(self.policy, self.rollout)

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
            {"policy", "ref", "rollout"}
            | ({"critic"} if cfg.ppo.uses_critic else set())
            | ({"dpo"} if paths.dpo else set())
            | ({"rm"} if paths.rm else set())
        )
        self.threads = cfg.resources.actor_threads
        self.env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        self.gpu_share = default_gpu_share(cfg, self.wanted, device)
        self.tokens = model_sampling_token_ids(paths.policy)  # the one EOS, the pad, what is never sampled
        self.dpo_trainable = bool(paths.dpo) and cfg.ppo.dpo_refresh.every > 0
        self._shared: dict[str, PlacementGroup] = {}

    def colocated_with(self, names: set[str]) -> set[str]:
        """``names`` and every group that shares a placement group with one of them."""
        if self.cfg.resources.colocate_all:
            return set(self.wanted)
        out = set(names)
        for members in self.cfg.resources.colocate:
            members = {m for m in members if m in self.wanted}
            if members & out:
                out |= members
        return out

    def build_all(self) -> Groups:
        if self.cfg.resources.colocate_all:
            return self._build_colocated()
        groups = Groups(
            **{name: None for name in ("policy", "critic", "ref", "rollout")},
            dpo_trainable=self.dpo_trainable,
        )
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
        if groups.colocated is not None:  # one process per rank holds them all
            groups.shutdown()
            fresh = self._build_colocated()
            for name in ("colocated", *GROUP_NAMES):
                setattr(groups, name, getattr(fresh, name))
            return names
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
        for members in [] if res.colocate_all else res.colocate:
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
            worker_kwargs={**kwargs, "num_threads": self.threads},
            resources=_resources(spec, self.gpu_share),
            placement_group=self._placement_group(name),
            env_vars=self.env,
            name=name,
            strategy=spec.strategy,
            ready_timeout_s=self.ready_timeout_s,
        )

    def _build_colocated(self) -> Groups:
        """One `ColocatedWorker` per rank holding every wanted model (all on one node:
        STRICT_PACK); each group is a member's view. A rank is one process: it asks for the most
        CPUs (and custom resources) any of its groups asks for, and for their GPU shares together
        (the models share its device)."""
        res = self.cfg.resources
        members = {
            name: self._worker(name) for name in GROUP_NAMES if name in self.wanted and name != "rollout"
        }
        rollout = {k: v for k, v in self._worker("rollout")[1].items() if k != "model_path"}
        specs = [_resources(getattr(res, name), self.gpu_share) for name in sorted(self.wanted)]
        custom: dict[str, float] = {}
        for spec in specs:
            for key, value in spec.custom:
                custom[key] = max(custom.get(key, 0), value)
        resources = Resources(
            num_cpus=max(s.num_cpus for s in specs),
            num_gpus=sum(s.num_gpus for s in specs),
            custom=tuple(sorted(custom.items())),
        )
        base = ActorGroup(
            ColocatedWorker,
            res.policy.ranks,
            worker_kwargs={"members": members, "rollout": rollout, "num_threads": self.threads},
            resources=resources,
            env_vars=self.env,
            name="colocated",
            strategy="STRICT_PACK",
            ready_timeout_s=self.ready_timeout_s,
        )
        views = {name: MemberGroup(base, name) if name in self.wanted else None for name in GROUP_NAMES}
        return Groups(**views, colocated=base, dpo_trainable=self.dpo_trainable)

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
                config=self._engine(ppo.critic_lr, res.ranks_of("critic")),
            )  # fmt: skip
        if name == "dpo" and self.dpo_trainable:
            refresh = ppo.dpo_refresh
            engine = dataclasses.replace(
                self._engine(refresh.lr, res.ranks_of("dpo")), gradient_accumulation_steps=1,
                total_steps=max(1, ppo.steps // refresh.every) * refresh.epochs,
            )  # fmt: skip
            return TrainableScorer, dict(
                model_path=paths.dpo, config=engine, scoring_fn="rto.forward:response_logprobs"
            )
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
            top_p=ppo.top_p, seed=self.cfg.seed, dtype=dtype, generation_cache=ppo.generation_cache,
            **self.tokens, **({"generate_fn": self.generate_fn} if self.generate_fn else {}),
        )  # fmt: skip


def build_groups(
    cfg: PPOJob, paths: ModelPaths, optimizer_steps: int, dtype: str, generate_fn=None, device: str = "cpu"
) -> Groups:
    """Create every group; groups listed together in `resources.colocate` share one placement group."""
    return GroupBuilder(cfg, paths, optimizer_steps, dtype, generate_fn, device).build_all()
