"""`ppo`: distributed PPO with the configured token reward (RTO by default)."""

from __future__ import annotations

from pipelines.stages import StageContext, register_stage
from rto.errors import UserError
from rto.ppo.groups import ModelPaths
from rto.ppo.trainer import PPOInputs, run_ppo


def model_paths(ctx: StageContext) -> ModelPaths:
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
        from reward.scoring import check_same_tokenizer

        check_same_tokenizer(dpo, policy)
    if cfg.reward.needs_rm or cfg.ppo.critic_init == "rm":
        if not ctx.has_stage("rm"):
            why = f"reward.mode '{cfg.reward.mode}'" if cfg.reward.needs_rm else "ppo.critic_init 'rm'"
            raise UserError(
                f"{why} needs a reward model: add 'rm' to stages",
                source=str(ctx.run.config_path),
                field="stages",
            )
        rm = str(ctx.run.stage_dir("rm"))
        from reward.scoring import check_same_tokenizer

        check_same_tokenizer(rm, policy)  # the RM and a critic made from it read the policy's token ids
    critic = rm if cfg.ppo.critic_init == "rm" else policy
    return ModelPaths(
        policy=policy, critic=critic, ref=policy, dpo=dpo, rm=rm if cfg.reward.needs_rm else None
    )


def pruned_sampler(ctx: StageContext, policy: str):
    pruner = ctx.cfg.ppo.rollout_pruner
    if pruner == "none":
        return None
    if pruner == "adaptinfer":
        from prune.adaptinfer.rollout import make_generate_fn as adaptinfer_generate_fn

        return adaptinfer_generate_fn(ctx.cfg.adaptinfer, policy)
    from prune.ftp.rollout import make_generate_fn  # provided by the ftp package

    return make_generate_fn(ctx.stage_dir("ftp"))


@register_stage(
    "ppo", sections=("ppo", "reward", "resources", "adaptinfer"), uses=("sft", "dpo", "rm", "ftp")
)
def run_ppo_stage(ctx: StageContext) -> dict:
    from pipelines.stages.rm import load_normalization

    paths = model_paths(ctx)
    normalization = (
        load_normalization(ctx.run.stage_dir("rm")) if paths.rm and ctx.cfg.reward.rm_normalize else None
    )
    stage_hash = ctx.extras.get("stage_hash", "default")
    return run_ppo(
        PPOInputs(
            cfg=ctx.cfg,
            run=ctx.run,
            out_dir=ctx.out_dir,
            paths=paths,
            prompts=ctx.prepared.records("prompts"),
            ground_truth=ctx.prepared.record_ground_truth(),
            rm_normalization=normalization,
            stage_hash=stage_hash,
            resume=ctx.resume,
            dtype=ctx.cfg.dtype,
            device=ctx.device,
            generate_fn=pruned_sampler(ctx, paths.policy),
            log=ctx.log,
            image_root=ctx.prepared.root,
        )
    )
