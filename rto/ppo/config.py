"""Settings of the `ppo` stage (docs/design.md, "One PPO iteration on Ray"). Defaults suit the built-in task on a laptop CPU;
the RTO paper's recipe for Llama-3-8B is in configs/llama3-8b-rto.yaml."""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import Field, ValidationInfo, field_validator, model_validator

from reward.config import RewardConfig
from rto.errors import FieldError
from rto.schema import Section, Seed


class FaultToleranceConfig(Section):
    """What the PPO stage does when an actor or a node is lost (docs/cluster.md, "When a node is lost")."""

    retries: int = Field(
        3, ge=0, description="Recoveries in a row before the job gives up (a completed step resets the "
        "count); 0: fail at the first lost actor",
    )  # fmt: skip
    backoff_s: float = Field(
        1.0,
        ge=0,
        description="Pause before a recovery; doubles with each further one in a row (at most 60 s)",
    )
    wait_for_resources_s: float = Field(
        300.0, ge=0, description="How long to wait for room to place a group (a lost node's replacement) "
        "before failing with the group's name",
    )  # fmt: skip
    probe_timeout_s: float = Field(
        60.0, gt=0, description="After a failure, how long a live actor may take to answer its health check"
    )

    @model_validator(mode="after")
    def _can_recover(self) -> FaultToleranceConfig:
        if self.retries > 0 and self.wait_for_resources_s == 0:
            raise FieldError(
                "wait_for_resources_s",
                f"is 0 with retries {self.retries}: a lost actor could never be placed again; give the "
                "cluster time to replace it (e.g. 300) or set retries: 0",
            )
        return self


class DPORefreshConfig(Section):
    """Online refresh of the token reward's DPO model (docs/design.md, "Online DPO refresh"): every
    ``every`` PPO steps, the DPO model takes ``epochs`` optimizer steps of the DPO loss on
    preference pairs built from that step's rollouts (per prompt, the best-labelled sample against
    the worst), with the reference model as DPO's reference."""

    every: int = Field(0, ge=0, description="Refresh every N PPO steps; 0: the DPO model stays frozen")
    label: Literal["rm", "ground_truth"] = Field(
        "rm",
        description="What ranks a prompt's samples: the reward model's score, or the task's ground truth",
    )
    lr: float = Field(1e-5, gt=0, description="The DPO model's learning rate (AdamW, constant)")
    beta: float | None = Field(None, gt=0, description="DPO's beta; None: the dpo stage's (dpo.beta)")
    epochs: int = Field(1, gt=0, description="Optimizer steps on each refresh's pairs")
    min_gap: float = Field(
        0.0, ge=0, description="Pair a prompt's best and worst samples only when their labels differ by more"
    )


class PPOConfig(Section):
    seed: Seed | None = Field(
        None,
        description="The ppo stage's seed (default: the job's `seed`): PPO with several seeds from the same "
        "SFT, DPO and RM stages, which the job's seed would train again",
    )
    steps: int = Field(30, gt=0, description="PPO iterations (rollout + update)")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts sampled per iteration")
    samples_per_prompt: int = Field(1, gt=0)
    train_batch_size: int = Field(32, gt=0, description="Samples per optimizer step (minibatch)")
    micro_batch_size: int = Field(
        32, gt=0, description="Samples per forward/backward (gradient accumulation)"
    )
    epochs: int = Field(1, gt=0, description="Passes over each rollout batch")
    actor_lr: float = Field(5e-5, gt=0)
    critic_lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_eps: float = Field(0.2, gt=0, description="Policy ratio clip")
    value_clip: float = Field(0.2, gt=0, description="Value clip around the rollout's values")
    advantage_estimator: str = Field(
        "gae", description="Advantage estimator, a name in `rto.ppo.algo.ADVANTAGE_ESTIMATORS`"
    )
    policy_loss: str = Field("ppo_clip", description="Policy loss, a name in `rto.ppo.algo.POLICY_LOSSES`")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    entropy_coef: float = Field(0.0, ge=0)
    whiten_advantages: bool = True
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    critic_init: Literal["rm", "policy"] = Field(
        "rm", description="Initialise the critic from the RM or the policy"
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    checkpoint_every: int = Field(5, gt=0, description="Save a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, gt=0)
    rollout_pruner: str = Field(
        "none",
        description="The rollout sampler, a name in `prune.samplers`: none (the dense policy), ftp (text; "
        "needs the ftp stage) or adaptinfer (vision-language policies; settings in the adaptinfer section)",
    )
    is_cap: float = Field(
        2.0, gt=0, description="Truncation C of importance weights min(pi_dense/pi_sampler, C)"
    )
    reuse_rollout_logprobs: bool | None = Field(
        None, description="Take the policy's log-probs and entropy of a dense rollout from the sampling logits "
        "instead of a second policy pass (one forward fewer per step; the first minibatch's ratio then checks "
        "that sampler and trainer agree); None: when the job runs in float32, where they agree to ~1e-6 "
        "(in bf16 the cached decoding and the training forward differ: a recomputed pass is kept)",
    )  # fmt: skip
    generation_cache: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="The KV cache of the dense rollout sampler: static (preallocated, written in "
        "place) or dynamic (grown by concatenation, a copy of the whole cache per token); auto: static for a "
        "text policy on the CPU (the copies are 15 % of a 25 M policy's decoding there; the gain measured so "
        "far is within noise), dynamic on a GPU and for vision-language policies. The same tokens either "
        "way; not part of the stage's cache key",
    )  # fmt: skip
    sampler_kl_guard: float | None = Field(
        None, gt=0, description="With a pruned rollout sampler: when a step's sampler_kl (the sampler's KL from "
        "the dense policy on its own samples, per token) exceeds this, the next step's rollouts are sampled by "
        "the dense policy (on-policy: no importance weights) and pruned sampling resumes the step after; "
        "None: never. No effect with dense rollouts",
    )  # fmt: skip
    trace_samples: int | None = Field(
        None, gt=0, description="Rollouts per step written to traces (None: all)"
    )
    max_prompts: int | None = Field(
        None, gt=0, description="Train on the first N prompts of the prompt set only (a prompt budget, "
        "e.g. the RTO paper's data-fraction experiment); None: all of them",
    )  # fmt: skip
    eval_every: int = Field(
        0, ge=0, description="Every N steps and at the last, sample the held-out eval prompts with the "
        "rollout sampler (eval.temperature, eval.max_new_tokens, eval.top_p) and log their ground truth "
        "(heldout_gt, heldout_gt_se in the metrics); needs a task with a ground truth; 0: off",
    )  # fmt: skip
    fault_tolerance: FaultToleranceConfig = Field(default_factory=FaultToleranceConfig)
    dpo_refresh: DPORefreshConfig = Field(default_factory=DPORefreshConfig)
    tensorboard: bool = True
    wandb: bool = Field(False, description="Also log to Weights & Biases (needs `pip install wandb`)")

    @field_validator("advantage_estimator", "policy_loss")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        """A name in its registry (the defaults are; others are checked against the registry)."""
        if value == cls.model_fields[info.field_name].default:
            return value
        from rto.ppo import algo  # deferred: torch; only a name other than the default needs the registry

        registry = (
            algo.ADVANTAGE_ESTIMATORS if info.field_name == "advantage_estimator" else algo.POLICY_LOSSES
        )
        if value not in registry:
            raise ValueError(f"unknown {registry.kind} {value!r}; known: {', '.join(registry.names())}")
        return value

    @model_validator(mode="after")
    def _group_baseline(self) -> PPOConfig:
        """An estimator whose baseline is the prompt's other samples (rloo, grpo) needs several."""
        if self.advantage_estimator == "gae":
            return self
        from rto.ppo import algo  # deferred: torch; only an estimator other than GAE needs the registry

        needed = algo.estimator_min_group(self.advantage_estimator)
        if needed > self.samples_per_prompt:
            raise FieldError(
                "samples_per_prompt",
                f"ppo.advantage_estimator {self.advantage_estimator!r} needs a group baseline: set "
                f"ppo.samples_per_prompt >= {needed} (now {self.samples_per_prompt})",
            )
        return self

    @model_validator(mode="after")
    def _refresh_pairs(self) -> PPOConfig:
        """A refresh pairs samples of one prompt: it needs several per prompt."""
        if self.dpo_refresh.every and self.samples_per_prompt < 2:
            raise FieldError(
                "dpo_refresh.every",
                f"is {self.dpo_refresh.every}: a refresh pairs a prompt's best sample with its worst, so set "
                f"ppo.samples_per_prompt >= 2 (now {self.samples_per_prompt})",
            )
        return self

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator reads a critic's values; without one the trainer builds no
        critic group and skips the value loss."""
        if self.advantage_estimator == "gae":
            return True
        from rto.ppo import algo  # deferred: torch; only an estimator other than GAE needs the registry

        return algo.estimator_needs_critic(self.advantage_estimator)

    @model_validator(mode="after")
    def _batches(self) -> PPOConfig:
        total = self.rollout_batch_size * self.samples_per_prompt
        if self.train_batch_size > total:
            raise FieldError(
                "train_batch_size",
                f"train_batch_size ({self.train_batch_size}) exceeds rollout samples per step ({total})",
            )
        if total % self.train_batch_size:
            raise FieldError(
                "train_batch_size",
                f"ppo.rollout_batch_size × samples_per_prompt ({total}) must be a multiple of ppo.train_batch_size "
                f"({self.train_batch_size}): the remainder would be dropped from every step",
            )
        if self.train_batch_size % self.micro_batch_size:
            raise FieldError(
                "micro_batch_size",
                f"ppo.train_batch_size ({self.train_batch_size}) must be a multiple of ppo.micro_batch_size "
                f"({self.micro_batch_size})",
            )
        return self

    def accumulation_steps(self, ranks: int) -> int:
        """Forward/backward calls per optimizer step of a trainable group with `ranks` ranks: each
        call gives every rank `micro_batch_size` rows of the `train_batch_size` minibatch. The
        DeepSpeed engine's gradient accumulation and the trainer's calls both come from here."""
        rows_per_call = self.micro_batch_size * ranks
        if self.train_batch_size % rows_per_call:
            raise ValueError(
                f"train_batch_size {self.train_batch_size} is not a multiple of micro_batch_size × ranks "
                f"({self.micro_batch_size} × {ranks})"
            )
        return self.train_batch_size // rows_per_call


class GroupResources(Section):
    ranks: int = Field(1, ge=1, description="Ray actors in the group (DeepSpeed ranks for trainable groups)")
    cpus: float = Field(0.25, gt=0, description="CPUs per actor (fractions allowed)")
    gpus: float = Field(0.0, ge=0, description="GPUs per actor (fractions allowed)")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the group's actors on nodes (its placement-group strategies): "
        "PACK as few nodes as possible, SPREAD over as many as possible, STRICT_*: or fail",
    )  # fmt: skip
    node_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor also takes, to pin the group to "
        "nodes started with them (`ray start --resources '{\"trainer\": 8}'`)",
    )  # fmt: skip

    @field_validator("node_resources")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not name:
                raise ValueError(f"'{name}' is not a custom resource (use cpus / gpus)")
            if not amount > 0:
                raise ValueError(f"'{name}': expected an amount > 0, got {amount}")
        return value


class ResourcesConfig(Section):
    ray_address: str | None = Field(
        None, description="Existing cluster ('auto' or ray://host:port); None starts Ray in-process"
    )
    num_cpus: float | None = Field(None, gt=0, description="CPUs for an in-process Ray")
    num_gpus: float | None = Field(None, ge=0)
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Torch threads of the driver process (sft/dpo/rm/eval); None keeps torch's default",
    )
    policy: GroupResources = Field(default_factory=GroupResources)
    critic: GroupResources = Field(default_factory=GroupResources)
    ref: GroupResources = Field(default_factory=GroupResources)
    dpo: GroupResources = Field(default_factory=GroupResources)
    rm: GroupResources = Field(default_factory=GroupResources)
    rollout: GroupResources = Field(default_factory=GroupResources)
    actor_threads: int = Field(
        1, ge=1, description="Torch threads of each Ray actor process; a colocated rank runs every phase, "
        "so give it the cores its node has for it",
    )  # fmt: skip
    colocate: Literal["all"] | list[list[Literal["policy", "critic", "ref", "dpo", "rm", "rollout"]]] = Field(
        default_factory=list,
        description="Groups that share one placement group's bundles; 'all': each rank is one process "
        "holding every model, sampling with the policy's own weights (docs/design.md, colocated mode)",
    )

    @property
    def colocate_all(self) -> bool:
        return self.colocate == "all"

    def ranks_of(self, group: str) -> int:
        """The ranks ``group`` really has: its own, or the policy's with ``colocate: all``."""
        return getattr(self, "policy" if self.colocate_all else group).ranks

    @model_validator(mode="after")
    def _one_process_per_rank(self) -> ResourcesConfig:
        """With ``colocate: all`` every rank holds every model: the groups' ranks are the policy's,
        and a rank's models share one node."""
        if not self.colocate_all:
            return self
        for name in ("critic", "ref", "dpo", "rm", "rollout"):
            spec = getattr(self, name)
            if "ranks" in spec.model_fields_set and spec.ranks != self.policy.ranks:
                raise FieldError(
                    f"{name}.ranks",
                    f"is {spec.ranks} with colocate: all, where every rank holds every model: leave it out "
                    f"or set it to resources.policy.ranks ({self.policy.ranks})",
                )
        for name in ("policy", "critic", "ref", "dpo", "rm", "rollout"):
            spec = getattr(self, name)
            if spec.strategy in ("SPREAD", "STRICT_SPREAD"):
                raise FieldError(
                    f"{name}.strategy",
                    f"is {spec.strategy} with colocate: all: a colocated run keeps its ranks on one node "
                    "(use the distributed groups, colocate: [] or lists of groups, to spread them over nodes)",
                )
        return self


class PPOJob(Protocol):
    """The parts of a job the PPO core reads; the job file's `rto.config.Config` has them (the
    core does not import it: the job schema sits above the core, beside the stages)."""

    seed: int
    ppo: PPOConfig
    reward: RewardConfig
    resources: ResourcesConfig

    def model_dump(self, **kwargs: Any) -> dict: ...
