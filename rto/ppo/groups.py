"""Builds the PPO actor groups (policy, critic, ref, dpo, rm, rollout) from the config."""

from __future__ import annotations

from dataclasses import dataclass

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


def _resources(spec: GroupResources, gpu_share: float) -> Resources:
    return Resources(num_cpus=spec.cpus, num_gpus=spec.gpus or gpu_share)


def default_gpu_share(cfg: PPOJob, wanted: set[str], device: str) -> float:
    """On CUDA with no `gpus` set anywhere, every actor gets an equal share of one GPU, so that
    `--set device=cuda` alone runs the whole job on one device."""
    res = cfg.resources
    if device != "cuda" or any(getattr(res, name).gpus for name in wanted):
        return 0.0
    actors = sum(getattr(res, name).ranks for name in wanted)
    return 1.0 / actors


def build_groups(
    cfg: PPOJob, paths: ModelPaths, optimizer_steps: int, dtype: str, generate_fn=None, device: str = "cpu"
) -> Groups:
    """Create every group; groups listed together in `resources.colocate` share one placement group."""
    res = cfg.resources
    wanted = (
        {"policy", "critic", "ref", "rollout"}
        | ({"dpo"} if paths.dpo else set())
        | ({"rm"} if paths.rm else set())
    )
    gpu_share = default_gpu_share(cfg, wanted, device)
    shared: dict[str, tuple] = {}
    for members in res.colocate:
        members = [m for m in members if m in wanted]
        if not members:
            continue
        ranks = max(getattr(res, m).ranks for m in members)
        bundle = {"CPU": sum(getattr(res, m).cpus for m in members)}
        gpus = sum(getattr(res, m).gpus or gpu_share for m in members)
        if gpus:
            bundle["GPU"] = gpus
        pg = create_placement_group(ranks, bundle)
        for m in members:
            shared[m] = (pg, getattr(res, m))

    def group(name: str, cls, **kwargs) -> ActorGroup:
        spec: GroupResources = getattr(res, name)
        pg = shared.get(name, (None,))[0]
        return ActorGroup(
            cls,
            spec.ranks,
            worker_kwargs=kwargs,
            resources=_resources(spec, gpu_share),
            placement_group=pg,
            name=name,
        )

    ppo = cfg.ppo

    def engine(lr: float, ranks: int) -> EngineConfig:
        return EngineConfig(
            zero_stage=ppo.zero_stage,
            bf16=dtype == "bfloat16",
            lr=lr,
            warmup_steps=ppo.warmup_steps,
            total_steps=optimizer_steps,
            gradient_accumulation_steps=ppo.accumulation_steps(ranks),
            micro_batch_size=ppo.micro_batch_size,
            grad_clip=ppo.max_grad_norm,
            seed=cfg.seed,
            scheduler="constant_with_warmup",
        )

    frozen_dtype = dtype
    tokens = model_sampling_token_ids(paths.policy)  # the one EOS, the pad, what is never sampled
    groups = Groups(
        policy=group(
            "policy", TrainableWorker, model_path=paths.policy, config=engine(ppo.actor_lr, res.policy.ranks)
        ),
        critic=group(
            "critic",
            TrainableWorker,
            model_path=paths.critic,
            model_kind=paths.critic_kind,
            config=engine(ppo.critic_lr, res.critic.ranks),
        ),
        ref=group(
            "ref",
            FrozenModelWorker,
            model_path=paths.ref,
            scoring_fn="rto.forward:response_logprobs",
            dtype=frozen_dtype,
        ),
        rollout=group(
            "rollout",
            RolloutWorker,
            model_path=paths.policy,
            max_new_tokens=ppo.max_new_tokens,
            temperature=ppo.temperature,
            top_p=ppo.top_p,
            seed=cfg.seed,
            dtype=frozen_dtype,
            **tokens,
            **({"generate_fn": generate_fn} if generate_fn else {}),
        ),
    )
    if paths.dpo:
        groups.dpo = group(
            "dpo",
            FrozenModelWorker,
            model_path=paths.dpo,
            scoring_fn="rto.forward:response_logprobs",
            dtype=frozen_dtype,
        )
    if paths.rm:
        groups.rm = group(
            "rm", FrozenModelWorker, model_path=paths.rm, model_kind="sequence_classification",
            scoring_fn="rto.forward:sequence_scores", dtype=frozen_dtype,
        )  # fmt: skip
    return groups
