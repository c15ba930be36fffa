"""`ppo`: distributed PPO with the configured token reward (RTO by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.stages import StageContext, register_stage
from pipelines.stages.rm import load_normalization
from prune.samplers import samplers
from rto.errors import UserError
from rto.models import is_vision_language, load_processor, load_tokenizer

if TYPE_CHECKING:  # the PPO core (torch, ray) is imported when the stage runs
    from rto.config import Config
    from rto.ppo.groups import ModelPaths


def model_paths(ctx: StageContext) -> ModelPaths:
    # deferred: every stage module is imported to validate a job (start-up time)
    from reward.scoring import check_same_tokenizer
    from rto.ppo.groups import ModelPaths

    cfg = ctx.cfg
    policy = ctx.policy_init()
    dpo = rm = None
    if cfg.reward.needs_dpo:
        if not ctx.has_stage("dpo"):
            raise UserError(
                f"reward.mode '{cfg.reward.mode}' needs a DPO model: add 'dpo' to stages",
                source=str(ctx.run.config_path), field="stages",
            )  # fmt: skip
        dpo = str(ctx.run.stage_dir("dpo"))

        check_same_tokenizer(dpo, policy)
    critic_from_rm = cfg.ppo.critic_init == "rm" and cfg.ppo.uses_critic
    if cfg.reward.needs_rm or critic_from_rm:
        if not ctx.has_stage("rm"):
            why = f"reward.mode '{cfg.reward.mode}'" if cfg.reward.needs_rm else "ppo.critic_init 'rm'"
            raise UserError(
                f"{why} needs a reward model: add 'rm' to stages",
                source=str(ctx.run.config_path),
                field="stages",
            )
        rm = str(ctx.run.stage_dir("rm"))

        check_same_tokenizer(rm, policy)  # the RM and a critic made from it read the policy's token ids
    critic = rm if cfg.ppo.critic_init == "rm" else policy
    return ModelPaths(
        policy=policy, critic=critic, ref=policy, dpo=dpo, rm=rm if cfg.reward.needs_rm else None
    )


def pruned_sampler(ctx: StageContext, policy: str):
    """The configured rollout sampler (`prune.samplers`), or None for the dense policy."""
    spec = samplers().get(ctx.cfg.ppo.rollout_pruner)
    return spec.build(ctx.cfg, policy, ctx.stage_dir(spec.stage) if spec.stage else None)


@register_stage(
    "ppo", rank=4, sections=("ppo", "reward", "resources", "adaptinfer"), uses=("sft", "dpo", "rm", "ftp"),
    revision=1,  # 1: dense rollouts no longer drawn from HF's default top-k 50 (docs/real-models.md)
)  # fmt: skip
def run_ppo_stage(ctx: StageContext) -> dict:

    # deferred: every stage module is imported to validate a job (start-up time)
    from rto.ppo.trainer import PPOInputs, run_ppo

    paths = model_paths(ctx)
    normalization = (
        load_normalization(ctx.run.stage_dir("rm")) if paths.rm and ctx.cfg.reward.rm_normalize else None
    )
    stage_hash = ctx.extras.get("stage_hash", "default")
    prompts, tokenizer, processing_class = prompt_set(ctx, paths.policy)
    return run_ppo(
        PPOInputs(
            cfg=ppo_job(ctx.cfg),
            run=ctx.run,
            out_dir=ctx.out_dir,
            paths=paths,
            prompts=prompts,
            tokenizer=tokenizer,
            processing_class=processing_class,
            ground_truth=ctx.prepared.ground_truth(),
            rm_normalization=normalization,
            stage_hash=stage_hash,
            resume=ctx.resume,
            dtype=ctx.cfg.dtype,
            device=ctx.device,
            generate_fn=pruned_sampler(ctx, paths.policy),
            log=ctx.log,
            heldout=heldout_set(ctx, paths.policy),
        )
    )


def ppo_job(cfg: Config) -> Config:
    """The job as the PPO core sees it: its `seed` is the stage's (`ppo.seed` where set)."""
    seed = cfg.stage_seed("ppo")
    return cfg if seed == cfg.seed else cfg.model_copy(update={"seed": seed})


def heldout_set(ctx: StageContext, policy: str):
    """The held-out prompts `ppo.eval_every` samples (the eval stage's), or None when it is 0."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from rto.ppo.trainer import HeldOut

    cfg = ctx.cfg
    if not cfg.ppo.eval_every:
        return None
    ground_truth = ctx.prepared.ground_truth()
    if ground_truth is None:
        raise UserError(
            f"ppo.eval_every is {cfg.ppo.eval_every}, but this job's task has no ground truth to score "
            "held-out answers with (the built-in tasks have one): set it to 0",
            source=str(ctx.run.config_path), field="ppo.eval_every",
        )  # fmt: skip
    prompts, _, _ = prompt_set(ctx, policy, role="eval_prompts")
    return HeldOut(
        prompts=prompts, ground_truth=ground_truth, temperature=cfg.eval.temperature,
        max_new_tokens=cfg.eval.max_new_tokens, top_p=cfg.eval.top_p, batch_size=cfg.eval.batch_size,
    )  # fmt: skip


def prompt_set(ctx: StageContext, policy: str, role: str = "prompts"):
    """(the PPO prompts, the tokenizer that decodes responses, what is saved with the models):
    a vision-language policy's prompts carry pictures (encoded by its processor). The training
    prompts are cut to `ppo.max_prompts`."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from pipelines.prompts import TextPrompts
    from pipelines.tasks.image_data import ImagePrompts

    records = ctx.prepared.records(role)
    limit = ctx.cfg.ppo.max_prompts
    if role == "prompts" and limit is not None:
        if limit > len(records):
            raise UserError(
                f"ppo.max_prompts is {limit}, but the prompt set has only {len(records)} prompts",
                source=str(ctx.run.config_path), field="ppo.max_prompts",
            )  # fmt: skip
        records = records[:limit]
    if is_vision_language(policy):
        processor = load_processor(policy)
        return ImagePrompts(processor, records, ctx.prepared.root), processor.tokenizer, processor
    tokenizer = load_tokenizer(policy)
    return TextPrompts(tokenizer, records), tokenizer, tokenizer
