"""The job file: one YAML document validated against a typed schema.

Every section is a pydantic model that forbids unknown keys, so a typo is an error rather than a
silently ignored setting. `load_config` reads the file, applies `--set a.b=value` overrides, and
turns any validation failure into a one-line `UserError` naming the file, the field path and what
was expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from prune.adaptinfer.config import AdaptInferConfig
from prune.ftp.config import FTPConfig
from prune.samplers import samplers
from reward.config import RewardConfig
from rto.errors import FieldError, UserError
from rto.ppo.config import PPOConfig, ResourcesConfig
from rto.schema import Section, Seed


def stage_order() -> tuple[str, ...]:
    """The stages, in the order they always run (whatever order a job lists them in): derived from
    the stage registry (`pipelines.stages`)."""
    from pipelines.stages import stage_order as order  # deferred: the stage registry imports this module

    return order()


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith((".jsonl", ".json", ".parquet"))


def check_path_or_hub(value: str, what: str) -> str:
    """A local path must exist; anything else must look like a Hub name (`org/name`)."""
    local = Path(value).expanduser()
    if local.exists():
        return str(local)
    if _looks_local(value):
        raise ValueError(f"{what} '{value}' does not exist")
    if not _HUB_NAME.match(value):
        raise ValueError(f"'{value}' is neither an existing path nor a Hub name like 'org/name'")
    return value


# ---------------------------------------------------------------- models and data


_POSITIVE_INT = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "head_dim", "image_size", "patch_size",
                 "projection_dim")  # fmt: skip
_POSITIVE_FLOAT = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "initializer_range")
_FRACTION = ("attention_dropout",)
_FLAG = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_ACT = ("hidden_act",)
TEXT_ARCH = (
    set(_POSITIVE_INT[:7])
    | {"rms_norm_eps", "rope_theta", "initializer_range"}
    | set(_FRACTION)
    | set(_FLAG)
    | set(_ACT)
)
"""Llama fields a built-in model's `arch` may override."""
VISION_ARCH = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "projection_dim", "layer_norm_eps", "hidden_act", "attention_dropout"}  # fmt: skip
"""CLIP vision-tower fields `arch.vision` of tiny-llava may override."""


def check_arch(arch: dict, allowed: set[str], prefix: str = "arch") -> None:
    """Known keys with sensible values, and head counts that divide (transformers would fail later)."""
    for key, value in arch.items():
        field = f"{prefix}.{key}"
        if key not in allowed:
            raise FieldError(field, f"unknown architecture field; expected one of {sorted(allowed)}")
        if key in _POSITIVE_INT and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FieldError(field, f"must be a positive integer, got {value!r}")
        if key in _POSITIVE_FLOAT and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf")
        ):
            raise FieldError(field, f"must be a positive number, got {value!r}")
        if key in _FRACTION and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1
        ):
            raise FieldError(field, f"must be in [0, 1), got {value!r}")
        if key in _FLAG and not isinstance(value, bool):
            raise FieldError(field, f"must be true or false, got {value!r}")
        if key in _ACT and value not in (
            "silu",
            "gelu",
            "gelu_new",
            "relu",
            "quick_gelu",
            "gelu_pytorch_tanh",
        ):
            raise FieldError(field, f"unknown activation {value!r}")
    heads, kv = arch.get("num_attention_heads"), arch.get("num_key_value_heads")
    hidden = arch.get("hidden_size")
    if hidden and heads and "head_dim" not in arch and hidden % heads:
        raise FieldError(f"{prefix}.num_attention_heads", f"{heads} heads do not divide hidden_size {hidden}")
    if heads and kv and heads % kv:
        raise FieldError(f"{prefix}.num_key_value_heads", f"{kv} key/value heads do not divide {heads} heads")


class ModelSpec(Section):
    """Where a model comes from: a Hub name or local folder, or a built-in tiny architecture."""

    path: str | None = Field(None, description="Hub name (org/name) or local folder with a saved HF model")
    builtin: Literal["tiny-llama", "tiny-llava"] | None = Field(
        None,
        description="Build a small random model from a config: tiny-llama (text task), "
        "tiny-llava (image task: CLIP-style vision tower + Llama)",
    )
    arch: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the built-in shape (LlamaConfig fields)"
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_path_or_hub(v, "model folder")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError(
                "set exactly one of 'path' (Hub name or folder) and 'builtin' (tiny-llama, tiny-llava)"
            )
        if self.arch and self.builtin is None:
            raise ValueError("'arch' overrides only apply to a 'builtin' model")
        if self.builtin is not None:
            arch = dict(self.arch)
            vision = arch.pop("vision", None)
            if vision is not None and self.builtin != "tiny-llava":
                raise FieldError("arch.vision", "only tiny-llava has a vision tower")
            if vision is not None and not isinstance(vision, dict):
                raise FieldError("arch.vision", f"must be a mapping of CLIP fields, got {vision!r}")
            check_arch(arch, TEXT_ARCH)
            check_arch(vision or {}, VISION_ARCH, "arch.vision")
        return self


class DataSource(Section):
    """A data set in TRL's formats: a JSONL/Parquet file, or a Hub data set name."""

    path: str = Field(description="file.jsonl / file.parquet, or a Hub data set name")
    split: str = "train"
    limit: int | None = Field(None, gt=0, description="Use only the first N rows")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_path_or_hub(v, "data file")


class BuiltinTaskConfig(Section):
    """What every built-in task has: a seed and the sizes of its generated data sets."""

    seed: Seed = 0
    n_sft: int = Field(4000, gt=0, description="SFT examples")
    n_prompts: int = Field(1024, gt=0, description="PPO training prompts")
    n_eval: int = Field(128, gt=0, description="Held-out evaluation prompts")

    def adjust_job(self, job: Config) -> None:
        """Apply the task's defaults to the rest of `job` and check what the task cannot run."""
        raise NotImplementedError


class TextTaskConfig(BuiltinTaskConfig):
    """The built-in synthetic text task (`pipelines/tasks/text.py`)."""

    name: Literal["text"] = "text"
    n_pairs: int = Field(3000, gt=0, description="Training preference pairs")
    n_eval_pairs: int = Field(400, gt=0, description="Held-out preference pairs")
    label_temperature: float = Field(0.5, gt=0, description="Bradley-Terry annotator temperature (noise)")
    max_sentences: int = Field(4, ge=1, le=8)
    variant: Literal["plain", "facts"] = Field(
        "plain",
        description="plain: short requests (pipelines/tasks/text.py); facts: a long context of facts "
        "the answer must use (pipelines/tasks/text_facts.py)",
    )
    n_facts: int = Field(
        56, ge=4, le=84, description="facts variant: facts per context (5 tokens each; one per noun)"
    )

    def adjust_job(self, job: Config) -> None:
        """The facts variant's prompts must fit the built-in models' positions."""
        if self.variant != "facts":
            return
        need = 5 * self.n_facts + 16
        for role in ("policy", "reward_model"):
            spec = getattr(job, role, None)
            if spec is None or getattr(spec, "builtin", None) is None:
                continue
            positions = (spec.arch or {}).get("max_position_embeddings", 128)
            if positions < need + 64:
                raise FieldError(
                    f"{role}.arch.max_position_embeddings",
                    f"{positions} positions cannot hold the facts variant's prompts (about {need} tokens "
                    f"for task.n_facts = {self.n_facts}) and a response; use at least {need + 64}",
                )


class ImageTaskConfig(BuiltinTaskConfig):
    """The built-in image task (`pipelines/tasks/image.py`): generated pictures, questions with known answers."""

    name: Literal["image"] = "image"
    n_sft: int = Field(16000, gt=0, description="SFT examples")
    n_eval: int = Field(256, gt=0, description="Held-out evaluation prompts")
    n_pairs: int = Field(4096, gt=0, description="Preference pairs for dpo (right vs wrong answer)")
    n_eval_pairs: int = Field(256, gt=0, description="Held-out preference pairs")
    negatives: Literal["confusable", "random"] = Field(
        "confusable",
        description="Rejected answer of a preference pair: one the picture suggests (another object's "
        "colour, a shape drawn elsewhere, another colour's count) or any wrong answer of the kind",
    )
    describe_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Share of SFT examples that ask for a full description of the picture (dense "
        "supervision that teaches a tiny model to read the image much sooner)",
    )
    sft_careless: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the SFT set's colour, shape and count questions that a careless annotator "
        "answers without looking ('red', 'nothing', 'zero'): demonstrations wrong in a way the ground truth sees, "
        "which PPO can correct (docs/vision-language.md)",
    )

    def adjust_job(self, job: Config) -> None:
        """The image task's defaults and rules for the rest of the job (called by `Config`)."""
        unsupported = [s for s in job.stages if s not in IMAGE_TASK_STAGES]
        if unsupported:
            raise FieldError(
                "stages",
                f"stage '{unsupported[0]}' does not support task 'image' (supported: {list(IMAGE_TASK_STAGES)})",
            )
        if "policy" not in job.model_fields_set:  # the image task's default policy is the tiny VLM
            job.policy = ModelSpec(builtin="tiny-llava")
        elif job.policy.builtin == "tiny-llama":
            raise FieldError(
                "policy.builtin", "task 'image' needs a vision-language policy: tiny-llava or a path"
            )
        # no reward-model stage: the sentence-level reward is the rule reward, the critic the policy's;
        # the token reward is RTO's when there is a DPO model, else PPO's (rule reward + KL)
        mode = "rto" if "dpo" in job.stages else "ppo"
        unset = {k: v for k, v in (("mode", mode), ("sentence_reward", "ground_truth"))
                 if k not in job.reward.model_fields_set}  # fmt: skip
        if unset:
            job.reward = type(job.reward).model_validate({**job.reward.model_dump(), **unset})
        if "critic_init" not in job.ppo.model_fields_set:
            job.ppo.critic_init = "policy"
        if job.ppo.critic_init == "rm":
            raise FieldError(
                "ppo.critic_init",
                "'rm' needs a reward model, which task 'image' has no stage for; use 'policy'",
            )
        if "ppo" in job.stages and job.reward.needs_dpo and "dpo" not in job.stages:
            raise FieldError(
                "reward.mode",
                f"'{job.reward.mode}' needs a DPO model: add 'dpo' to stages, or use reward.mode ppo",
            )
        if "ppo" in job.stages and job.reward.needs_rm:
            raise FieldError(
                "reward.sentence_reward",
                "'rm' needs a reward model, which task 'image' has no stage for; use 'ground_truth'",
            )


def _task_name(value: Any) -> str:
    """Which built-in task a `task` section means (text when it does not say)."""
    return value.get("name", "text") if isinstance(value, dict) else getattr(value, "name", "text")


IMAGE_TASK_STAGES = ("sft", "dpo", "ppo", "eval")
"""Stages the image task supports (no reward-model stage: its sentence-level reward is the ground
truth; FTP is text-only)."""


class DataConfig(Section):
    """External data; each entry replaces what the built-in task would generate."""

    sft: DataSource | None = None
    pairs: DataSource | None = None
    eval_pairs: DataSource | None = None
    prompts: DataSource | None = None
    eval_prompts: DataSource | None = None


# ---------------------------------------------------------------- stage settings


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(128, gt=8)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory for large models, "
        "about a third more time (TRL turns it on by default; we do not)",
    )


class SFTConfig(TrainConfig):
    epochs: float = Field(2.0, gt=0)


class DPOConfig(TrainConfig):
    beta: float = Field(0.1, gt=0, description="DPO beta (not reused by the token reward)")
    negatives: Literal["data", "policy"] = Field(
        "data",
        description="Rejected answers: the pairs' own (data), or, for the image task, the SFT policy's "
        "most likely wrong answer to each pair's question (policy: pairs built from its own mistakes)",
    )
    lr: float = Field(2e-4, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


class RMConfig(TrainConfig):
    init: Literal["base", "sft"] = Field(
        "base", description="Start from the `reward_model` spec (base) or from the SFT policy (sft)"
    )
    lr: float = Field(5e-4, gt=0)


class EvalConfig(Section):
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.7, ge=0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, gt=0)
    samples_per_prompt: int = Field(1, gt=0)
    models: list[Literal["base", "sft", "dpo", "ppo"]] = Field(
        default_factory=lambda: ["base", "sft", "dpo", "ppo"],
        description="Policies to evaluate; those whose stage has no output are left out",
    )


# ---------------------------------------------------------------- the job


class Config(Section):
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    stages: list[str] = Field(description="Stages to run, from the stage registry (rto.config.stage_order())")
    task: (
        Annotated[
            Annotated[TextTaskConfig, Tag("text")] | Annotated[ImageTaskConfig, Tag("image")],
            Discriminator(_task_name),
        ]
        | None
    ) = Field(
        default_factory=TextTaskConfig,
        description="Built-in task (name: text or image); null for external data",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    policy: ModelSpec = Field(default_factory=lambda: ModelSpec(builtin="tiny-llama"))
    reward_model: ModelSpec = Field(
        default_factory=lambda: ModelSpec(
            builtin="tiny-llama",
            arch={
                "hidden_size": 64,
                "intermediate_size": 192,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
        ),
        description="Base model of the sentence-level reward model",
    )
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    ftp: FTPConfig = Field(default_factory=FTPConfig)
    adaptinfer: AdaptInferConfig = Field(
        default_factory=lambda: AdaptInferConfig(enabled=False),
        description="Vision-token pruning of image-task rollouts (used when ppo.rollout_pruner is adaptinfer)",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one stage")
        order = stage_order()
        unknown = [s for s in v if s not in order]
        if unknown:
            raise ValueError(f"unknown stage '{unknown[0]}'; expected some of {list(order)}")
        if len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        return [s for s in order if s in v]

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.task is None:
            needs = {"sft": "sft", "dpo": "pairs", "rm": "pairs", "ppo": "prompts", "eval": "eval_prompts"}
            for stage, source in needs.items():
                if stage in self.stages and getattr(self.data, source) is None:
                    raise FieldError(
                        "stages", f"stage '{stage}' needs data.{source} when there is no built-in task"
                    )
        if self.task is not None:
            self.task.adjust_job(self)
        if self.dpo.negatives == "policy" and not isinstance(self.task, ImageTaskConfig):
            raise FieldError(
                "dpo.negatives",
                "'policy' picks the SFT policy's most likely wrong answer among a question's answers, "
                "which only the image task has; use 'data'",
            )
        if not isinstance(self.task, ImageTaskConfig) and self.policy.builtin == "tiny-llava":
            raise FieldError("policy.builtin", "'tiny-llava' is the image task's model; set task.name: image")
        self._check_sampler()
        if self.reward.sentence_reward == "ground_truth" and self.task is None:
            raise FieldError("reward.sentence_reward", "'ground_truth' needs a built-in task (task.name)")
        if self.dtype == "float16" and self.device == "cpu":
            raise FieldError("dtype", "float16 is not supported on the CPU; use float32 or bfloat16")
        if "ppo" in self.stages:
            self._check_ppo_geometry()
        self._check_dpo_refresh()
        if self.reward.mode == "rs_ppo" and self.ppo.gamma != 1.0:
            raise FieldError(
                "ppo.gamma",
                f"is {self.ppo.gamma} with reward.mode 'rs_ppo', whose DPO terms cancel over a response only "
                "undiscounted: set ppo.gamma: 1 (or use reward.mode 'rto')",
            )
        return self

    def _check_dpo_refresh(self) -> None:
        refresh = self.ppo.dpo_refresh
        if not refresh.every:
            return
        if not self.reward.needs_dpo:
            raise FieldError(
                "ppo.dpo_refresh.every",
                f"is {refresh.every}, but reward.mode '{self.reward.mode}' has no DPO term to refresh",
            )
        if refresh.label == "rm" and not self.reward.needs_rm:
            raise FieldError(
                "ppo.dpo_refresh.label",
                f"is 'rm', but reward.mode '{self.reward.mode}' with sentence_reward "
                f"'{self.reward.sentence_reward}' runs no reward model: use 'ground_truth'",
            )
        if refresh.label == "ground_truth" and self.task is None:
            raise FieldError("ppo.dpo_refresh.label", "'ground_truth' needs a built-in task (task.name)")
        if refresh.beta is None:
            refresh.beta = self.dpo.beta

    def _check_ppo_geometry(self) -> None:
        """Every PPO minibatch splits into the same whole number of micro-batches on every rank of
        each trainable group (what DeepSpeed accumulates, and what ZeRO-3 needs to stay in step)."""
        ppo = self.ppo
        for group in ("policy", "critic"):
            ranks = self.resources.ranks_of(group)
            if ppo.train_batch_size % (ppo.micro_batch_size * ranks):
                raise FieldError(
                    "ppo.train_batch_size",
                    f"{ppo.train_batch_size} must be a multiple of ppo.micro_batch_size × resources.{group}.ranks "
                    f"({ppo.micro_batch_size} × {ranks} = {ppo.micro_batch_size * ranks}): every rank of the "
                    f"{group} group takes micro_batch_size rows per forward/backward",
                )

    def _check_sampler(self) -> None:
        """`ppo.rollout_pruner` names a registered sampler (`prune.samplers`) that fits the policy."""
        registry = samplers()
        name = self.ppo.rollout_pruner
        if name not in registry:
            raise FieldError(
                "ppo.rollout_pruner", f"unknown sampler {name!r}; known: {', '.join(registry.names())}"
            )
        spec = registry.get(name)
        vision = isinstance(self.task, ImageTaskConfig)
        if spec.policies == "text" and vision:
            raise FieldError(
                "ppo.rollout_pruner",
                f"'{name}' samples text policies; task 'image' has a vision-language one",
            )
        if spec.policies == "vision" and not vision:
            raise FieldError(
                "ppo.rollout_pruner", f"'{name}' samples vision-language policies: it needs task.name: image"
            )
        if self.resources.colocate_all and not spec.shares_weights:
            raise FieldError(
                "ppo.rollout_pruner",
                f"'{name}' samples with a model of its own, and resources.colocate: all samples with the "
                "policy's weights: use the distributed groups (resources.colocate: []) with this sampler",
            )
        problem = spec.check(self) if spec.check is not None else None
        if problem is not None:
            raise FieldError(*problem)

    def stage_seed(self, stage: str) -> int:
        """The seed a stage runs with: `ppo.seed` for the ppo stage where it is set, else `seed`."""
        if stage == "ppo" and self.ppo.seed is not None:
            return self.ppo.seed
        return self.seed

    def section_hash(self, *paths: str) -> str:
        """Hash of the named (dotted) sections, to tell whether a stage's output is still valid.
        `ppo.seed` counts only where it differs from the job's `seed` (the same run otherwise), and
        `ppo.sampler_kl_guard` only where it is set and the rollouts are pruned (no effect otherwise);
        `ppo.generation_cache` never (the same tokens, logits within rounding)."""
        dumped = self.model_dump(mode="json")
        if dumped["ppo"].get("seed") in (None, dumped["seed"]):
            dumped["ppo"].pop("seed", None)
        if dumped["ppo"].get("sampler_kl_guard") is None or dumped["ppo"].get("rollout_pruner") == "none":
            dumped["ppo"].pop("sampler_kl_guard", None)
        dumped["ppo"].pop("generation_cache", None)
        if dumped["ppo"].get("reuse_rollout_logprobs") is None:
            dumped["ppo"].pop("reuse_rollout_logprobs", None)
        picked = {}
        for path in paths:
            node: Any = dumped
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            picked[path] = node
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- inputs across stages


def stage_inputs(cfg: Config) -> list[tuple[str, str, str, str]]:
    """What each listed stage reads from an earlier stage under these settings:
    ``(stage, needed stage, field that asks for it, what for)``."""
    needs: list[tuple[str, str, str, str]] = []
    if "ppo" in cfg.stages:
        reward, ppo = cfg.reward, cfg.ppo
        if reward.needs_dpo:
            needs.append(
                (
                    "ppo",
                    "dpo",
                    "reward.mode",
                    f"reward.mode '{reward.mode}' uses the DPO model's token reward",
                )
            )
        if reward.needs_rm:
            why = f"reward.mode '{reward.mode}' adds the reward model's score (reward.sentence_reward 'rm')"
            needs.append(("ppo", "rm", "reward.sentence_reward", why))
        if ppo.critic_init == "rm" and ppo.uses_critic:  # a critic-free estimator builds no critic
            needs.append(
                (
                    "ppo",
                    "rm",
                    "ppo.critic_init",
                    "ppo.critic_init 'rm' starts the critic from the reward model",
                )
            )
        sampler = samplers().get(ppo.rollout_pruner)
        if sampler.stage is not None:
            needs.append(
                (
                    "ppo",
                    sampler.stage,
                    "ppo.rollout_pruner",
                    f"ppo.rollout_pruner '{sampler.name}' reads the {sampler.stage} stage's output",
                )
            )
    return needs


def check_stage_inputs(
    cfg: Config, finished: set[str] | frozenset[str] = frozenset(), source: str = "<config>"
) -> None:
    """Refuse, before anything runs, a job in which a stage needs the output of a stage that is
    neither listed in `stages` nor already finished in the run directory (`finished`)."""
    available = set(cfg.stages) | set(finished)
    for stage, needed, field, why in stage_inputs(cfg):
        if needed not in available:
            where = " or run it first in this run directory" if not finished else ""
            raise UserError(
                f"stage '{stage}' needs stage '{needed}': {why}; add '{needed}' to stages{where}",
                source=source,
                field=field,
            )


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' appears twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError("expected KEY=VALUE, e.g. --set ppo.steps=10", source="--set", field=item)
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][\w]*", p) for p in parts):
        raise UserError("expected a dotted key like ppo.steps", source="--set", field=key)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse value '{raw}': {exc.problem}", source="--set", field=key) from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> set[str]:
    """Apply `a.b=value` overrides in place; returns the overridden dotted keys."""
    touched = set()
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"'{part}' is a value, not a section", source="--set", field=".".join(parts))
            node = child
        node[parts[-1]] = value
        touched.add(".".join(parts))
    return touched


def _describe(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    got = error.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        tags = (error.get("ctx") or {}).get("expected_tags", "")
        return f"unknown name {(error.get('ctx') or {}).get('tag')!r}; expected one of {tags}"
    msg = msg.removeprefix("Value error, ")
    if got is not None and not isinstance(got, dict | list) and kind != "value_error":
        return f"{msg} (got {got!r})"
    return msg


def format_validation_error(exc: ValidationError, source: str, overridden: set[str]) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = list(first["loc"])
    if len(loc) > 2 and loc[0] == "task" and loc[1] in ("text", "image"):
        loc.pop(1)  # the tagged union's member is not a field of the job file
    field = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "union_tag_invalid" and field == "task":
        field = "task.name"
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        field = ".".join(p for p in (field if first["loc"] else "", cause.field) if p)
    origin = source
    for key in overridden:
        if field == key or field.startswith(key + ".") or key.startswith(field + "."):
            origin = f"{source} (--set {key})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{origin}: field '{field}': {_describe(first)}{more}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory, not a job file", source=str(path))
    if not path.is_file():
        raise UserError("config file not found", source=str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"is not UTF-8 text (byte {exc.start})", source=str(path)) from None
    except OSError as exc:
        raise UserError(f"cannot read the job file ({exc.strerror or exc})", source=str(path)) from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise UserError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}", source=str(path), field=where
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("expected a mapping of sections at the top level", source=str(path))
    overridden = apply_overrides(data, overrides or [])
    return config_from_dict(data, str(path), overridden)


def config_from_dict(data: dict, source: str = "<config>", overridden: set[str] | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source, overridden or set())) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
