"""`rto score`: score a set of responses with the configured token reward and write one trace file,
so the reward can be inspected (with `rto traces`, pandas or pyarrow) before any PPO runs.

Responses come from a JSONL/Parquet file with `prompt` and `response` (or TRL `completion`) columns,
or are sampled from the policy on the held-out prompts. No critic exists yet, so `value`,
`advantage` and `return` are null.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.prepare import _is_empty, _text_kind, _type_name, prepare
from pipelines.stages.rm import load_normalization
from reward.compose import batch_rewards, rm_score_column, sentence_ends
from reward.scoring import FrozenLM, FrozenRM, check_same_tokenizer
from reward.traces import trace_columns, write_traces
from rto.config import Config
from rto.errors import UserError
from rto.generation import decode_responses, encode_completion, encode_prompt, pack, prompt_text, sample
from rto.models import load_causal_lm, load_tokenizer, sampling_token_ids
from rto.progress import LOG_FILE, library_output
from rto.rundir import RunDir, check_output_file
from rto.runtime import resolve_device


def load_responses(path: Path) -> list[tuple[object, str]]:
    """(prompt, response text) rows of a JSONL/Parquet file; every row checked, the first bad one
    a `UserError` naming the file, the row and the column."""

    if path.is_dir():
        raise UserError("is a directory, not a responses file", source=str(path), field="--responses")
    if not path.is_file():
        raise UserError("responses file not found", source=str(path), field="--responses")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise UserError(
                f"not a readable Parquet file ({str(exc).splitlines()[0]})", source=str(path)
            ) from None
    else:
        import json

        rows = []
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            if raw.strip():
                try:
                    rows.append(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    raise UserError(f"line {n} is not UTF-8 text", source=str(path)) from None
                except json.JSONDecodeError as exc:
                    raise UserError(f"line {n} is not valid JSON ({exc.msg})", source=str(path)) from None
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"row {n} is not an object but {_type_name(row)}", source=str(path))
        column = "response" if "response" in row else "completion"
        response = row.get(column)
        if "prompt" not in row or response is None:
            raise UserError(
                f"row {n} needs 'prompt' and 'response' (or 'completion') columns", source=str(path)
            )
        for name, value in (("prompt", row["prompt"]), (column, response)):
            if _text_kind(value) is None:
                raise UserError(
                    f"row {n}: '{name}' must be a string or a list of {{role, content}} messages, "
                    f"got {_type_name(value)}",
                    source=str(path),
                )
        if isinstance(response, list):
            if not response:
                raise UserError(f"row {n} has an empty response", source=str(path))
            response = response[-1]["content"]
        if _is_empty(response):
            raise UserError(f"row {n} has an empty response", source=str(path))
        out.append((row["prompt"], response))
    if not out:
        raise UserError("no responses in the file", source=str(path))
    return out


def score_responses(
    cfg: Config,
    run_dir: Path,
    responses: Path | None,
    out: Path | None,
    n_samples: int = 64,
    verbose: bool = False,
) -> Path:
    """Score `responses` (or samples of the policy) in the run directory, holding its lock;
    library output goes to RUN_DIR/rto.log unless `verbose`."""
    run = RunDir(run_dir)
    if out is not None:
        check_output_file(out, "-o")  # before any scoring
    pairs = load_responses(responses) if responses is not None else None
    run.check_usable()
    with run.lock():
        library_output(run.root / LOG_FILE, verbose)
        return _score(cfg, run.create(), pairs, out, n_samples)


def _score(cfg: Config, run: RunDir, pairs: list | None, out: Path | None, n_samples: int) -> Path:

    device = resolve_device(cfg.device)
    prepared = prepare(cfg, run)
    if prepared.is_image_task:
        raise UserError(
            "`rto score` scores text policies; an image-task run's rewards are in its PPO traces "
            "(rto traces RUN_DIR)",
            source=str(run.config_path),
            field="task.name",
        )
    policy = str(run.stage_dir("sft")) if run.is_done("sft") else prepared.model("policy")
    dpo = str(run.stage_dir("dpo")) if run.is_done("dpo") else None
    rm = str(run.stage_dir("rm")) if run.is_done("rm") else None
    if cfg.reward.needs_dpo and dpo is None:
        raise UserError(
            f"reward.mode '{cfg.reward.mode}' needs a finished dpo stage in {run.root}", field="stages"
        )
    if cfg.reward.needs_rm and rm is None:
        raise UserError(
            f"reward.mode '{cfg.reward.mode}' needs a finished rm stage in {run.root}", field="stages"
        )
    if dpo:
        check_same_tokenizer(dpo, policy)
    tokenizer = load_tokenizer(policy)

    if pairs is not None:
        encoded = [
            encode_completion(
                tokenizer, p, r if not isinstance(p, list) else [{"role": "assistant", "content": r}]
            )
            for p, r in pairs
        ]
        sequences, attention_mask, prompt_len, response_mask = pack(
            [e[0] for e in encoded], [e[1] for e in encoded], tokenizer.pad_token_id
        )
        prompt_records = [{"prompt": p} for p, _ in pairs]
        texts = [r for _, r in pairs]
    else:
        records = prepared.records("eval_prompts")[:n_samples]
        model = load_causal_lm(policy, device=device).eval()
        never = sampling_token_ids(tokenizer, model.config.get_text_config().vocab_size)["suppress_token_ids"]
        torch.manual_seed(cfg.seed)
        samples = sample(
            model, [encode_prompt(tokenizer, r["prompt"]) for r in records], eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature,
            top_p=cfg.ppo.top_p, suppress_token_ids=never,
        )  # fmt: skip
        sequences, attention_mask, prompt_len = (
            samples.sequences.cpu(),
            samples.attention_mask.cpu(),
            samples.prompt_len,
        )
        response_mask = samples.response_mask.cpu()
        prompt_records = records
        texts = decode_responses(tokenizer, samples)
    prompts = [prompt_text(r["prompt"]) for r in prompt_records]

    mask = response_mask.float()
    logprobs = FrozenLM(policy, device=device).logprobs(sequences, attention_mask, prompt_len)
    ref_logprobs = logprobs.clone()  # before PPO the policy is its own reference
    dpo_logprobs = (
        FrozenLM(dpo, device=device).logprobs(sequences, attention_mask, prompt_len)
        if cfg.reward.needs_dpo
        else None
    )
    rm_scores = FrozenRM(rm, device=device).scores(sequences, attention_mask) if cfg.reward.needs_rm else None
    normalization = (
        load_normalization(rm) if rm and cfg.reward.needs_rm and cfg.reward.rm_normalize else (None, None)
    )
    terminated = [
        bool(((row == tokenizer.eos_token_id) & m.bool()).any())
        for row, m in zip(sequences[:, prompt_len:], response_mask, strict=True)
    ]
    gt = prepared.ground_truth(prompt_only=True)
    gts = [gt(r, t, d) for r, t, d in zip(prompt_records, texts, terminated, strict=True)] if gt else None
    rewards = batch_rewards(
        cfg.reward, sentence_ends=sentence_ends(cfg.reward, tokenizer, sequences[:, prompt_len:], mask),
        response_mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, dpo_logprobs=dpo_logprobs,
        rm_scores=rm_scores, gt_rewards=gts, terminated=torch.tensor(terminated),
        rm_mean=normalization[0], rm_std=normalization[1],
    )  # fmt: skip
    token_ids = sequences[:, prompt_len:]
    tokens = [
        tokenizer.convert_ids_to_tokens(row[: int(m.sum())].tolist())
        for row, m in zip(token_ids, response_mask, strict=True)
    ]
    columns = trace_columns(
        step=0, prompts=prompts, responses=texts, tokens=tokens, token_ids=token_ids, response_mask=mask,
        rm_score=rm_score_column(cfg.reward, rewards), gt_reward=gts,
        logprob=logprobs, ref_logprob=ref_logprobs, dpo_logprob=dpo_logprobs,
        reward_dpo=rewards.reward_dpo if cfg.reward.needs_dpo else None, reward_kl=rewards.reward_kl, reward=rewards.reward,
    )  # fmt: skip
    out = out or run.root / "scores" / f"scored-{cfg.reward.mode}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_traces(out, columns, overwrite=True)
