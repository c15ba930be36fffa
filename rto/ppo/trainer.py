"""The PPO loop (docs/design.md, "One PPO iteration on Ray"), read top to bottom:

    prompts → rollout workers generate → policy/ref/dpo/rm/critic score concurrently
    → token rewards (reward.compose) → GAE → whitening → epochs × minibatches → push weights

Ray decides where each group runs; the math lives in `rto.ppo.algo` and `reward.compose`.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
import torch

from reward.compose import batch_rewards, rm_score_column, sentence_ends, separation_by_ground_truth
from reward.traces import list_trace_steps, remove_stale_temp_files, trace_columns, trace_path, write_traces
from rto.distributed import concat_results, init_ray
from rto.errors import ClusterError, UserError
from rto.generation import Sampler
from rto.ppo import checkpoint
from rto.ppo.algo import (
    ADVANTAGE_ESTIMATORS,
    masked_mean,
    masked_whiten,
    sampler_mismatch,
    truncated_is_weights,
)
from rto.ppo.config import PPOJob
from rto.ppo.faults import LOST, Rewind, Supervisor
from rto.ppo.groups import GroupBuilder, Groups, ModelPaths
from rto.ppo.logging import StepLogger
from rto.progress import console, make_progress
from rto.rundir import RunDir


class PromptSet(Protocol):
    """The prompts a PPO run draws from (a task's: `pipelines.prompts.TextPrompts`,
    `pipelines.tasks.image_data.ImagePrompts`)."""

    records: list[dict]  # the prompt records, as the ground truth reads them
    labels: list[str]  # each prompt as the traces show it

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (left-padded) of these prompts, plus
        ``pixel_values`` for a vision-language policy."""
        ...


class GroundTruth(Protocol):
    """A task's rule reward of a response to a prompt record (None where the task has none)."""

    def __call__(self, record: dict, response: str, terminated: bool) -> float: ...


@dataclass
class HeldOut:
    """Held-out prompts the policy answers every ``ppo.eval_every`` steps, scored by the task's ground
    truth: a learning curve that, unlike the training reward, does not depend on the rollouts'
    sampling temperature (the stage passes the ``eval`` section's settings)."""

    prompts: PromptSet
    ground_truth: GroundTruth
    temperature: float
    max_new_tokens: int
    top_p: float = 1.0
    batch_size: int = 64


@dataclass
class PPOInputs:
    cfg: PPOJob
    run: RunDir
    out_dir: Path
    paths: ModelPaths
    prompts: PromptSet
    tokenizer: Any  # decodes responses (a vision-language policy's: its processor's tokenizer)
    processing_class: Any  # saved beside the trained policy and critic (the tokenizer, or the processor)
    ground_truth: GroundTruth | None
    rm_normalization: tuple[float, float] | None
    stage_hash: str
    resume: bool
    dtype: str = "float32"
    device: str = "cpu"
    generate_fn: Sampler | None = None  # a pruned sampler (FTP, AdaptInfer), or None: dense HF generate
    log: Callable[[str], None] = print
    heldout: HeldOut | None = None  # with ppo.eval_every > 0


def prompt_indices(consumed: int, count: int, n_prompts: int, seed: int) -> list[int]:
    """Prompts `consumed … consumed+count` of an endless stream of seeded per-epoch shuffles."""
    indices = []
    for position in range(consumed, consumed + count):
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        indices.append(int(order[offset]))
    return indices


def score_concurrently(
    groups: Groups, samples: dict, prompt_len: int, micro: int, temperature: float
) -> dict:
    """Every scorer sees the same sequences; their passes run at the same time on their own actors.
    The trainable groups get equal shards (ZeRO-3 gathers parameters in every forward of every rank).
    A dense rollout that brought the policy's scores from its sampling logits (`policy_logprobs`,
    `policy_entropy`: ``ppo.reuse_rollout_logprobs``) is not scored by the policy again."""
    batch = {"sequences": samples["sequences"], "attention_mask": samples["attention_mask"]}
    if "pixel_values" in samples:
        batch["pixel_values"] = samples["pixel_values"]
    pending = {}
    if "policy_logprobs" not in samples:
        pending["policy"] = groups.policy.async_run_even(
            "score", batch, fn="rto.ppo.losses:policy_scores", prompt_len=prompt_len, temperature=temperature
        )
    if groups.critic is not None:  # a critic-free estimator has none
        pending["values"] = groups.critic.async_run_even(
            "score", batch, fn="rto.ppo.losses:critic_values", prompt_len=prompt_len
        )
    refs = {
        "ref_logprobs": groups.ref.async_run_sharded(
            "score", batch, prompt_len=prompt_len, micro_batch_size=micro
        ),
    }
    if groups.dpo is not None:
        refs["dpo_logprobs"] = groups.dpo.async_run_sharded(
            "score", batch, prompt_len=prompt_len, micro_batch_size=micro
        )
    if groups.rm is not None:
        refs["rm_scores"] = groups.rm.async_run_sharded("score", batch, micro_batch_size=micro)
    out = {name: concat_results(ray.get(r)) for name, r in refs.items()}
    out.update({name: p.get() for name, p in pending.items()})
    policy = out.pop("policy", None) or {
        "logprobs": samples["policy_logprobs"],
        "sampling_logprobs": samples["sampler_logprobs"],
        "entropy": samples["policy_entropy"],
    }
    out["logprobs"], out["sampling_logprobs"], out["entropy"] = (
        policy["logprobs"],
        policy["sampling_logprobs"],
        policy["entropy"],
    )
    return out


def trim_responses(samples: dict, prompt_len: int) -> dict:
    """Cut the response columns past the batch's longest real response (the samplers pad every
    response to ``max_new_tokens``): no scorer or update computes on padding. A causal model's
    log-probs and values of the kept positions do not depend on the columns cut."""
    mask = samples["response_mask"]
    keep = max(1, int(mask.sum(1).max()))
    if keep == mask.size(1):
        return samples
    out = dict(samples)
    out["sequences"] = samples["sequences"][:, : prompt_len + keep]
    out["attention_mask"] = samples["attention_mask"][:, : prompt_len + keep]
    for name in ("response_mask", "sampler_logprobs", "policy_logprobs", "policy_entropy"):
        if name in samples:
            out[name] = samples[name][:, :keep]
    return out


def all_finite(mask: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    keep = mask.bool()
    return all(t is None or bool(torch.isfinite(t[keep] if t.dim() == 2 else t).all()) for t in tensors)


def train_on_batch(groups: Groups, cfg: PPOJob, experience: dict, step: int) -> dict[str, float]:
    """PPO epochs × minibatches; each minibatch is split into the calls DeepSpeed accumulates.

    Also returns the invariant every PPO step must hold, measured on the first minibatch of the
    first epoch, whose every forward runs before any optimizer step: the policy ratio is 1
    (``first_minibatch_ratio_error`` = max |ratio − 1| over its tokens) and no value is clipped
    (``first_minibatch_value_clip_frac``), to float tolerance."""
    ppo, res = cfg.ppo, cfg.resources
    n = experience["sequences"].size(0)
    stats: dict[str, list[float]] = defaultdict(list)
    first: dict[str, list[float]] = defaultdict(list)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    trainers = [(ppo.accumulation_steps(res.ranks_of("policy")), groups.policy, "policy_loss")]
    if groups.critic is not None:
        trainers.append((ppo.accumulation_steps(res.ranks_of("critic")), groups.critic, "value_loss"))
    for epoch in range(ppo.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, ppo.train_batch_size):  # n is a multiple of train_batch_size
            rows = order[start : start + ppo.train_batch_size]
            minibatch = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in experience.items()}
            refs = []
            for calls, group, loss in trainers:
                for chunk in torch.tensor_split(torch.arange(len(rows)), calls):
                    piece = {
                        k: (v[chunk] if isinstance(v, torch.Tensor) else v) for k, v in minibatch.items()
                    }
                    refs.append(
                        group.async_run_sharded("train_step", piece, loss_fn=f"rto.ppo.losses:{loss}")
                    )
            for rank_results in ray.get([r for group_refs in refs for r in group_refs]):
                for key, value in rank_results.items():
                    stats[key].append(value)
                    if epoch == 0 and start == 0:
                        first[key].append(value)
    out = {k: sum(v) / len(v) for k, v in stats.items() if k not in ("loss", "ratio_error")}
    out["first_minibatch_ratio_error"] = max(first["ratio_error"])
    out["first_minibatch_value_clip_frac"] = max(first["value_clip_frac"], default=0.0)  # 0: no critic
    return out


def run_ppo(inputs: PPOInputs) -> dict:
    """The PPO stage: build the groups, run the steps, save the trained policy and critic.

    Lost actors are recovered by `rto.ppo.faults.Supervisor`; a lost trainable actor rewinds the
    stage to its last complete checkpoint, within this call, as ``--resume`` would."""
    cfg, run, log = inputs.cfg, inputs.run, inputs.log
    ppo = cfg.ppo
    ckpt_root = run.checkpoints_dir / f"ppo-{inputs.stage_hash}"
    latest = checkpoint.latest_checkpoint(ckpt_root)
    if latest is not None and not inputs.resume:
        raise UserError(
            f"an interrupted ppo stage left a checkpoint ({latest}); rerun with --resume to continue it, "
            f"or delete {ckpt_root} to start over",
            source=str(run.root),
            field="--resume",
        )
    samples_per_step = ppo.rollout_batch_size * ppo.samples_per_prompt
    optimizer_steps = ppo.steps * ppo.epochs * max(1, samples_per_step // ppo.train_batch_size)
    init_ray(cfg.resources.ray_address, cfg.resources.num_cpus)
    builder = GroupBuilder(
        cfg, inputs.paths, optimizer_steps, inputs.dtype, inputs.generate_fn, inputs.device,
        ready_timeout_s=ppo.fault_tolerance.wait_for_resources_s,
    )  # fmt: skip
    supervisor = Supervisor(ppo.fault_tolerance, builder, lambda g: g.sync_weights(), log, announce_placement)
    logger = StepLogger(run, ppo.tensorboard, ppo.wandb, cfg)
    initial_rng = checkpoint.rng_state()
    groups: Groups | None = None
    lost_steps = 0
    try:
        if latest is None:
            logger.archive_previous()
        while True:
            try:
                groups = builder.build_all()  # waits for room; a ClusterError names the group that has none
            except LOST as exc:  # a node lost while the groups were being built
                supervisor.count([], exc, "building the groups")
                continue
            announce_placement(groups.all())
            try:
                state, memory = run_steps(inputs, groups, supervisor, logger, ckpt_root, latest, initial_rng)
                break
            except Rewind as rewind:
                reached = logger.records[-1]["step"] if logger.records else 0
                latest = checkpoint.latest_checkpoint(ckpt_root)
                back_to = checkpoint.checkpoint_step(latest) if latest else 0
                lost_steps += max(0, reached - back_to)
                log(
                    f"[yellow]lost trainable actor {rewind}: rebuilding every group and continuing from "
                    f"{f'checkpoint step {back_to}' if latest else 'the start of the stage'} "
                    + (
                        f"(steps {back_to + 1}..{reached} are run again)"
                        if reached > back_to
                        else "(no step lost)"
                    )
                    + "[/yellow]"
                )
                groups.shutdown()
                builder.release()
                groups = None
                supervisor.settle(rewind.lost)
    except ClusterError as exc:
        latest = checkpoint.latest_checkpoint(ckpt_root)
        where = f"from {latest}" if latest else "from the start of the stage"
        raise ClusterError(f"{exc}; rerun with --resume (same run directory) to continue {where}") from None
    finally:
        logger.close()
        if groups is not None:
            groups.shutdown()
        builder.release()
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the finished stage's output replaces them
    return {
        **logger.summary(state),
        "restarts": supervisor.restarts,
        "steps_run_again": lost_steps,
        "peak_rss_mb": memory,
    }


def announce_placement(groups: list) -> None:
    """One unwrapped line per group, ``placement policy: 2 on node 1a2b3c4d (10.0.0.5)``: the job's
    log says where its groups run, and `rto jobs status` reads it from there."""
    for group in groups:
        console.print(f"placement {group.describe()}", soft_wrap=True, highlight=False)


def run_steps(
    inputs: PPOInputs,
    groups: Groups,
    supervisor: Supervisor,
    logger: StepLogger,
    ckpt_root: Path,
    latest: Path | None,
    initial_rng: dict,
) -> tuple[dict, dict]:
    """From ``latest`` (or the start) to the last step, then save the models; returns the final
    state and each group's peak memory. Raises `Rewind` when a trainable actor is lost."""
    run, log, ppo = inputs.run, inputs.log, inputs.cfg.ppo
    state = {"step": 0, "prompts_consumed": 0, "skipped_batches": 0, "restarts": 0, "dpo_refreshes": 0}
    if latest is not None:
        state = {
            **state,
            **supervisor.run(groups, lambda: checkpoint.load(latest, groups), "loading", retry=False),
        }
        supervisor.run(groups, groups.sync_weights, "weight sync")
        log(f"resumed from {latest} (step {state['step']})")
    else:
        checkpoint.restore_rng(initial_rng)
    supervisor.restarts = max(supervisor.restarts, int(state.get("restarts", 0)))
    checkpoint.remove_partial(ckpt_root)
    run.truncate_metrics("ppo", state["step"])
    logger.continue_after(state["step"])
    run.traces_dir.mkdir(exist_ok=True)
    remove_stale_temp_files(run.traces_dir)
    for stale in [s for s in list_trace_steps(run.traces_dir) if s > state["step"]]:
        trace_path(run.traces_dir, stale).unlink()
    with make_progress() as progress:
        task = progress.add_task("ppo", total=ppo.steps, completed=state["step"], info="")
        for step in range(state["step"] + 1, ppo.steps + 1):
            try:
                record = one_step(inputs, groups, state, step, supervisor)
            except ClusterError:
                save_after_giving_up(inputs, groups, state, ckpt_root, log)
                raise
            if eval_due(ppo, inputs.heldout, step):
                record.update(
                    supervisor.run(
                        groups,
                        lambda step=step: evaluate_heldout(inputs, groups, step),
                        f"the held-out evaluation of step {step}",
                    )
                )
            supervisor.step_completed()
            state["step"] = step
            state["restarts"] = supervisor.restarts
            logger.log(step, {**record, "restarts": supervisor.restarts})
            if step % ppo.checkpoint_every == 0 and step < ppo.steps:
                snapshot = {**state, "stage_hash": inputs.stage_hash}
                supervisor.run(
                    groups,
                    lambda step=step, snapshot=snapshot: checkpoint.save(
                        ckpt_root, step, groups, snapshot, ppo.keep_checkpoints
                    ),
                    f"the checkpoint of step {step}",
                    retry=False,
                )
            info = (
                f"gt {record['gt_reward']:.3f}"
                if "gt_reward" in record
                else f"rm {record.get('rm_score', 0):.3f}"
            )
            if "heldout_gt" in record:
                info += f" · held-out {record['heldout_gt']:.3f}"
            progress.update(task, completed=step, info=info)

    def finish() -> dict:
        memory = {group.name: round(max(group.run_all("peak_rss_mb")), 1) for group in groups.all()}
        groups.policy.run_all("save_hf", str(inputs.out_dir / "policy"))
        if groups.critic is not None:
            groups.critic.run_all("save_hf", str(inputs.out_dir / "critic"))
        if groups.dpo_trainable:  # the refreshed DPO model, reloadable like the dpo stage's
            groups.dpo.run_all("save_hf", str(inputs.out_dir / "dpo"))
        return memory

    memory = supervisor.run(groups, finish, "saving the models", retry=False)
    folders = (
        ["policy"]
        + (["critic"] if groups.critic is not None else [])
        + (["dpo"] if groups.dpo_trainable else [])
    )
    for folder in folders:
        inputs.processing_class.save_pretrained(inputs.out_dir / folder)
    return state, memory


def eval_due(ppo, heldout: HeldOut | None, step: int) -> bool:
    return heldout is not None and ppo.eval_every > 0 and (step % ppo.eval_every == 0 or step == ppo.steps)


def evaluate_heldout(inputs: PPOInputs, groups: Groups, step: int) -> dict[str, float]:
    """The policy of ``step`` answers every held-out prompt once; returns the mean ground truth and
    its standard error. The rollout workers are reseeded with one seed for every evaluation (the
    next step reseeds them for its own rollouts, so training draws the same samples either way)."""
    heldout, tokenizer = inputs.heldout, inputs.tokenizer
    start = time.perf_counter()
    groups.rollout.run_all("call", "rto.ppo.losses:reseed", inputs.cfg.seed * 100_003 + 99_991)
    gts: list[float] = []
    terminated_all: list[bool] = []
    n_tokens = 0
    for begin in range(0, len(heldout.prompts), heldout.batch_size):
        indices = list(range(begin, min(begin + heldout.batch_size, len(heldout.prompts))))
        samples = groups.rollout.run_sharded(
            "generate", heldout.prompts.batch(indices), temperature=heldout.temperature,
            max_new_tokens=heldout.max_new_tokens, top_p=heldout.top_p,
        )  # fmt: skip
        mask = samples["response_mask"].float()
        responses, terminated, _ = decode(tokenizer, samples, mask)
        gts += [
            heldout.ground_truth(heldout.prompts.records[i], r, t)
            for i, r, t in zip(indices, responses, terminated, strict=True)
        ]
        terminated_all += terminated
        n_tokens += int(mask.sum())
    mean = sum(gts) / len(gts)
    se = (sum((g - mean) ** 2 for g in gts) / (len(gts) - 1) / len(gts)) ** 0.5 if len(gts) > 1 else 0.0
    return {
        "heldout_gt": mean,
        "heldout_gt_se": se,
        "heldout_terminated": sum(terminated_all) / len(terminated_all),
        "heldout_response_length": n_tokens / len(gts),
        "time_heldout": time.perf_counter() - start,
    }


def save_after_giving_up(inputs: PPOInputs, groups: Groups, state: dict, ckpt_root: Path, log) -> None:
    """When the stage gives up and its trainable actors are still alive, checkpoint the last
    completed step, so that ``--resume`` loses nothing."""
    latest = checkpoint.latest_checkpoint(ckpt_root)
    if state["step"] == 0 or (latest is not None and checkpoint.checkpoint_step(latest) == state["step"]):
        return
    try:
        path = checkpoint.save(
            ckpt_root, state["step"], groups, {**state, "stage_hash": inputs.stage_hash},
            inputs.cfg.ppo.keep_checkpoints,
        )  # fmt: skip
        log(f"saved {path}: rerun with --resume to continue from step {state['step']}")
    except LOST:
        log("the trainable actors are lost too: --resume continues from the last checkpoint")


def one_step(
    inputs: PPOInputs, groups: Groups, state: dict, step: int, supervisor: Supervisor | None = None
) -> dict:
    """One PPO iteration; with a ``supervisor``, its phases recover from lost actors."""
    cfg, tokenizer, prompts = inputs.cfg, inputs.tokenizer, inputs.prompts
    guard = supervisor.run if supervisor is not None else _unguarded
    ppo = cfg.ppo
    times = {}
    t0 = time.perf_counter()
    chosen = prompt_indices(state["prompts_consumed"], ppo.rollout_batch_size, len(prompts), cfg.seed)
    chosen = [i for i in chosen for _ in range(ppo.samples_per_prompt)]
    state["prompts_consumed"] += ppo.rollout_batch_size
    prompt_batch = prompts.batch(chosen)
    prompt_len = prompt_batch["input_ids"].size(1)
    # a pruned sampler too far from the dense policy last step: this step samples with the dense policy
    dense_fallback = inputs.generate_fn is not None and bool(state.get("dense_rollouts_next", False))
    pruned = inputs.generate_fn is not None and not dense_fallback
    # a dense rollout's policy log-probs from its sampling logits: no second policy pass
    reuse = (
        ppo.reuse_rollout_logprobs if ppo.reuse_rollout_logprobs is not None else inputs.dtype == "float32"
    )

    def collect() -> tuple[dict, dict]:  # run again, the same, after lost scorers or samplers
        start = time.perf_counter()
        groups.rollout.run_all("call", "rto.ppo.losses:reseed", cfg.seed * 100_003 + step)
        generated = groups.rollout.run_sharded(
            "generate", prompt_batch, dense=dense_fallback, policy_scores=reuse
        )
        samples = trim_responses(generated, prompt_len)
        if "pixel_values" in prompt_batch:  # scorers and trainers see the whole picture (dense)
            samples["pixel_values"] = prompt_batch["pixel_values"]
        times["time_generate"] = time.perf_counter() - start
        t1 = time.perf_counter()
        scores = score_concurrently(groups, samples, prompt_len, ppo.micro_batch_size, ppo.temperature)
        times["time_score"] = time.perf_counter() - t1
        return samples, scores

    samples, scores = guard(groups, collect, f"the rollouts of step {step}")
    mask = samples["response_mask"].float()
    responses, terminated, tokens = decode(tokenizer, samples, mask)
    record: dict = {"samples": len(chosen)}
    if inputs.ground_truth is not None:
        gts = [
            inputs.ground_truth(prompts.records[i], r, t)
            for i, r, t in zip(chosen, responses, terminated, strict=True)
        ]
        record["gt_reward"] = sum(gts) / len(gts)
    else:
        gts = None
    rewards = batch_rewards(
        cfg.reward,
        sentence_ends=sentence_ends(cfg.reward, tokenizer, samples["sequences"][:, prompt_len:], mask),
        response_mask=mask,
        logprobs=scores["logprobs"],
        ref_logprobs=scores["ref_logprobs"],
        terminated=torch.tensor(terminated, dtype=torch.bool),
        dpo_logprobs=scores.get("dpo_logprobs"),
        rm_scores=scores.get("rm_scores"),
        gt_rewards=gts,
        rm_mean=inputs.rm_normalization[0] if inputs.rm_normalization else None,
        rm_std=inputs.rm_normalization[1] if inputs.rm_normalization else None,
    )
    values = scores.get("values")  # None without a critic
    if not all_finite(mask, rewards.reward, values, scores["sampling_logprobs"]):
        state["skipped_batches"] += 1
        inputs.log(
            f"[yellow]warning: step {step}: non-finite reward/value/log-prob in the batch; skipped[/yellow]"
        )
        return {**record, "skipped": 1, "skipped_batches": state["skipped_batches"], **times}

    estimator = ADVANTAGE_ESTIMATORS.get(ppo.advantage_estimator)
    advantages, returns = estimator(
        rewards.reward, values, mask, gamma=ppo.gamma, lam=ppo.lam, group_size=ppo.samples_per_prompt
    )
    train_advantages = masked_whiten(advantages, mask) if ppo.whiten_advantages else advantages
    is_weights = None
    if pruned:
        # both at the sampling temperature, before truncation (how every sampler defines its log-prob)
        is_weights = truncated_is_weights(
            scores["sampling_logprobs"], samples["sampler_logprobs"], mask, ppo.is_cap
        )

    keep = slice(None) if ppo.trace_samples is None else slice(0, ppo.trace_samples)
    write_traces(
        trace_path(inputs.run.traces_dir, step),
        trace_columns(
            step=step,
            prompts=[prompts.labels[i] for i in chosen][keep],
            responses=responses[keep],
            tokens=tokens[keep],
            token_ids=samples["sequences"][:, prompt_len:][keep],
            response_mask=mask[keep],
            rm_score=_rows(rm_score_column(cfg.reward, rewards), keep),
            gt_reward=gts[keep] if gts is not None else None,
            logprob=scores["logprobs"][keep],
            ref_logprob=scores["ref_logprobs"][keep],
            dpo_logprob=scores["dpo_logprobs"][keep] if "dpo_logprobs" in scores else None,
            reward_dpo=rewards.reward_dpo[keep] if cfg.reward.needs_dpo else None,
            reward_kl=rewards.reward_kl[keep],
            reward=rewards.reward[keep],
            value=_rows(values, keep),
            advantage=advantages[keep],
            **{"return": returns[keep]},
        ),
    )

    t2 = time.perf_counter()
    experience = {
        "sequences": samples["sequences"],
        "attention_mask": samples["attention_mask"],
        "response_mask": mask,
        "old_logprobs": scores["sampling_logprobs"],  # PPO's ratio is taken at the sampling temperature
        "old_values": values,
        "advantages": train_advantages,
        "returns": returns,
        "is_weights": is_weights,
        "prompt_len": prompt_len,
        "clip_eps": ppo.clip_eps,
        "policy_loss_name": ppo.policy_loss,
        "temperature": ppo.temperature,
        "entropy_coef": ppo.entropy_coef,
        "value_clip": ppo.value_clip,
    }
    if "pixel_values" in samples:
        experience["pixel_values"] = samples["pixel_values"]
    train_stats = guard(
        groups,
        lambda: train_on_batch(groups, cfg, experience, step),
        f"the update of step {step}",
        retry=False,
    )
    times["time_train"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    guard(groups, groups.sync_weights, f"the weight sync of step {step}")
    times["time_sync"] = time.perf_counter() - t3
    if groups.dpo_trainable:
        record["dpo_refreshes"] = state.setdefault("dpo_refreshes", 0)  # that scored this step's rollouts
        if step % ppo.dpo_refresh.every == 0:
            t4 = time.perf_counter()
            labels = gts if ppo.dpo_refresh.label == "ground_truth" else scores["rm_scores"].tolist()
            pairs = refresh_batch(ppo.dpo_refresh, ppo.samples_per_prompt, samples, scores, mask, labels)
            record["dpo_refresh_pairs"] = pairs["pair_sequences"].size(0)
            if record["dpo_refresh_pairs"] >= groups.dpo.num_actors:  # every rank takes part in a step
                pairs.update(
                    prompt_len=prompt_len, beta=ppo.dpo_refresh.beta, micro_batch_size=ppo.micro_batch_size
                )
                record.update(
                    guard(
                        groups,
                        lambda: refresh_dpo(groups, pairs, ppo.dpo_refresh.epochs),
                        f"the DPO refresh of step {step}",
                        retry=False,
                    )
                )
                state["dpo_refreshes"] += 1
            else:
                inputs.log(
                    f"[yellow]step {step}: {record['dpo_refresh_pairs']} preference pair(s) in the rollouts "
                    f"(labels differ by more than {ppo.dpo_refresh.min_gap}); DPO refresh skipped[/yellow]"
                )
            times["time_dpo_refresh"] = time.perf_counter() - t4
    times["time_step"] = time.perf_counter() - t0

    n_tokens = float(mask.sum())
    record.update(
        {
            "rm_score": _raw_sentence_score(cfg, scores, gts),
            "reward_total": float((rewards.reward * mask).sum(1).mean()),
            "reward_dpo": float((rewards.reward_dpo * mask).sum(1).mean()),
            "reward_kl": float((rewards.reward_kl * mask).sum(1).mean()),
            "kl": float(((scores["logprobs"] - scores["ref_logprobs"]) * mask).sum(1).mean()),
            "entropy": float(masked_mean(scores["entropy"], mask)),
            "value_mean": float(masked_mean(values, mask)) if values is not None else None,
            "advantage_std": float(advantages[mask.bool()].std()),
            "response_length": n_tokens / len(chosen),
            "terminated": sum(terminated) / len(terminated),
            "tokens_per_s": n_tokens / times["time_step"],
            "skipped_batches": state["skipped_batches"],
            **train_stats,
            **times,
        }
    )
    if cfg.reward.needs_dpo and gts is not None:  # does the DPO token term order responses as the GT does?
        separation = separation_by_ground_truth(rewards.reward_dpo, mask, gts)
        record.update({f"dpo_gt_{key}": value for key, value in separation.items()})
    if is_weights is not None:
        record["is_weight_mean"] = float(masked_mean(is_weights, mask))
        record.update(
            sampler_mismatch(scores["sampling_logprobs"], samples["sampler_logprobs"], mask, ppo.is_cap)
        )
    if inputs.generate_fn is not None:
        record["dense_fallback"] = int(dense_fallback)
        guard_kl = ppo.sampler_kl_guard
        state["dense_rollouts_next"] = pruned and guard_kl is not None and record["sampler_kl"] > guard_kl
    return {k: v for k, v in record.items() if v is not None}


def refresh_pairs(labels: list[float], group_size: int, min_gap: float) -> list[tuple[int, int]]:
    """(chosen, rejected) row indices: per prompt (``group_size`` consecutive rows), its best-labelled
    sample against its worst, when their labels differ by more than ``min_gap`` (ties make no pair)."""
    pairs = []
    for start in range(0, len(labels), group_size):
        rows = range(start, min(start + group_size, len(labels)))
        best = max(rows, key=lambda i: labels[i])
        worst = min(rows, key=lambda i: labels[i])
        if labels[best] - labels[worst] > min_gap:
            pairs.append((best, worst))
    return pairs


def refresh_batch(refresh, group_size: int, samples: dict, scores: dict, mask, labels) -> dict:
    """The DPO refresh's training batch from one step's rollouts: ``pair_* [P, 2, ...]`` (chosen,
    rejected) and their summed reference log-probs (already scored for the KL term)."""
    pairs = refresh_pairs(list(labels), group_size, refresh.min_gap)
    index = torch.tensor(pairs, dtype=torch.long).view(-1, 2)
    ref_sums = (scores["ref_logprobs"] * mask).sum(-1)
    return {
        "pair_sequences": samples["sequences"][index],
        "pair_attention_mask": samples["attention_mask"][index],
        "pair_response_mask": mask[index],
        "ref_logprob_sums": ref_sums[index],
    }


def refresh_dpo(groups: Groups, pairs: dict, epochs: int) -> dict[str, float]:
    """``epochs`` optimizer steps of the DPO loss on ``pairs`` (each rank on its share, weighted so
    that a step follows the mean over every pair). Reports the first step's loss, accuracy and
    margin (the DPO model before this refresh, on pairs it has not seen) and the last step's loss."""
    n_pairs = pairs["pair_sequences"].size(0)
    batch = {**pairs, "loss_scale": groups.dpo.num_actors / n_pairs}
    reports = []
    for _ in range(epochs):
        results = ray.get(
            groups.dpo.async_run_sharded("train_step", batch, loss_fn="rto.ppo.losses:dpo_pair_loss")
        )
        total = {key: sum(r[key] for r in results) for key in results[0] if key.startswith("dpo_refresh_")}
        reports.append(
            {name: total[f"dpo_refresh_{name}"] / n_pairs for name in ("loss_sum", "correct", "margin_sum")}
        )
    first = reports[0]
    return {
        "dpo_refresh_loss": first["loss_sum"],
        "dpo_refresh_accuracy": first["correct"],
        "dpo_refresh_margin": first["margin_sum"],
        "dpo_refresh_last_loss": reports[-1]["loss_sum"],
    }


def _unguarded(groups: Groups, phase: Callable, what: str, retry: bool = True):
    return phase()


def _raw_sentence_score(cfg: PPOJob, scores: dict, gts: list[float] | None) -> float | None:
    """Mean sentence-level score before normalisation: the RM's, or the ground truth used in its place."""
    if "rm_scores" in scores:
        return float(scores["rm_scores"].mean())
    if cfg.reward.uses_sentence_score and cfg.reward.sentence_reward == "ground_truth" and gts:
        return sum(gts) / len(gts)
    return None


def _rows(tensor: torch.Tensor | None, keep: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[keep]


def decode(tokenizer, samples: dict, mask: torch.Tensor):
    prompt_len = samples["sequences"].size(1) - mask.size(1)
    responses, terminated, tokens = [], [], []
    for row, row_mask in zip(samples["sequences"][:, prompt_len:].tolist(), mask.tolist(), strict=True):
        ids = [t for t, m in zip(row, row_mask, strict=True) if m]
        done = bool(ids) and ids[-1] == tokenizer.eos_token_id
        body = ids[:-1] if done else ids
        responses.append(tokenizer.decode(body, skip_special_tokens=True).strip())
        terminated.append(done)
        tokens.append(tokenizer.convert_ids_to_tokens(ids))
    return responses, terminated, tokens
