"""`dpo`: DPO from the SFT model on preference pairs (TRL's DPOTrainer), text or vision-language.
Output: π_dpo."""

from __future__ import annotations

from pipelines.stages import StageContext, no_grad, register_stage
from rto.models import load_model, load_processor, load_tokenizer, load_vision_lm


def preference_figures(
    policy_path: str, ref_path: str, tokenizer, pairs: list[dict], beta: float, device: str
) -> dict:
    """Held-out pairs: how often the reference (SFT) model and the DPO model prefer the chosen
    response, and how often DPO's implicit reward β·log π/π_ref ranks it first.

    "Prefers" compares the mean log-likelihood per token (chosen responses are longer on average,
    which alone lowers their total log-likelihood); the raw totals are reported too."""
    # deferred: every stage module is imported to validate a job (start-up time)
    import torch

    from pipelines.pairs import encode_pairs, logprob_sums
    from pipelines.training import in_thread, spare_cores
    from reward.scoring import FrozenLM

    chosen, rejected = encode_pairs(tokenizer, pairs)
    len_c = torch.tensor([len(c) for _, c in chosen], dtype=torch.float32)
    len_r = torch.tensor([len(c) for _, c in rejected], dtype=torch.float32)
    policy, ref = FrozenLM(policy_path, device=device), FrozenLM(ref_path, device=device)

    def sums(lm: FrozenLM) -> tuple[torch.Tensor, torch.Tensor]:
        return logprob_sums(lm, tokenizer, chosen), logprob_sums(lm, tokenizer, rejected)

    # the reference model's forwards on a second thread where there is a core for them (same sums)
    ref_sums = in_thread(sums, ref) if device == "cpu" and spare_cores() else None
    pc, pr = sums(policy)
    rc, rr = ref_sums.result() if ref_sums is not None else sums(ref)
    margin = beta * ((pc - rc) - (pr - rr))

    def rate(x: torch.Tensor) -> float:
        return float(x.float().mean())

    return {
        "ref_prefers_chosen": rate(rc / len_c > rr / len_r),
        "dpo_prefers_chosen": rate(pc / len_c > pr / len_r),
        "ref_prefers_chosen_total_logprob": rate(rc > rr),
        "dpo_prefers_chosen_total_logprob": rate(pc > pr),
        "dpo_reward_accuracy": rate(margin > 0),
        "dpo_reward_margin": float(margin.mean()),
    }


@register_stage("dpo", rank=1, sections=("dpo",), uses=("sft",))
def run_dpo(ctx: StageContext) -> dict:
    """TRL's DPOTrainer from the SFT model. A vision-language policy trains on picture + question
    pairs (TRL's vision path; right vs wrong answer for the built-in image task) with the SFT model
    loaded again as the explicit reference."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from datasets import Dataset
    from trl import DPOConfig

    from pipelines.training import ProgressCallback, dpo_trainer_class, quiet, save_model, trainer_kwargs

    cfg = ctx.cfg
    init = ctx.policy_init()
    pairs = ctx.prepared.records("pairs")
    negatives: dict = {}  # figures of `dpo.negatives: policy` (image task only)
    args = DPOConfig(
        **trainer_kwargs(cfg, cfg.dpo, ctx.out_dir, ctx.device),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
    )
    if ctx.prepared.is_image_task:
        args.max_length = None  # never cut a prompt's image tokens
        processing_class = load_processor(init, field="policy.path")
        models = {name: load_vision_lm(init, field="policy.path") for name in ("model", "ref_model")}
        if cfg.dpo.negatives == "policy":
            pairs, negatives = policy_negatives(
                models["ref_model"], processing_class, pairs, ctx.prepared.root, ctx.prepared.data["pairs"]
            )
        rows = image_pair_rows(pairs, ctx.prepared.root)

        def figures(held_out: list[dict]) -> dict:
            return image_preference_figures(
                str(ctx.out_dir),
                init,
                processing_class,
                held_out,
                cfg.dpo.beta,
                ctx.prepared.root,
                ctx.device,
            )
    else:
        processing_class, rows = load_tokenizer(init), pairs
        # loaded as every stage loads them (a pad row where the tokenizer needed one); the reference
        # explicitly, since TRL would reload it from the folder without that row
        models = {name: load_model(init, "causal_lm", field="policy.path") for name in ("model", "ref_model")}

        def figures(held_out: list[dict]) -> dict:
            return preference_figures(
                str(ctx.out_dir), init, processing_class, held_out, cfg.dpo.beta, ctx.device
            )

    trainer = dpo_trainer_class()(  # TRL's DPOTrainer, the reference forward beside the policy's
        **models,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processing_class,
        callbacks=[ProgressCallback("dpo", ctx.metrics)],
    )
    result = quiet(trainer).train()
    save_model(trainer, processing_class, ctx.out_dir)
    summary = {
        "train_loss": float(result.training_loss),
        "pairs": len(pairs),
        "steps": int(result.global_step),
    }
    summary.update(negatives)
    if "eval_pairs" in ctx.prepared.data:
        held_out = ctx.prepared.records("eval_pairs")
        summary.update(figures(held_out))
        gt = ctx.prepared.ground_truth(
            prompt_only=True
        )  # None for the image task (its answer is not in a pair)
        if gt is not None:
            summary["label_agrees_with_gt"] = _label_agreement(held_out, gt)
    return summary


def _label_agreement(pairs: list[dict], gt) -> float:
    agree = [gt(p, _text(p["chosen"]), True) > gt(p, _text(p["rejected"]), True) for p in pairs]
    return sum(agree) / len(agree)


def _text(value) -> str:
    """A response given as a string or as a conversation (its last message)."""
    return value if isinstance(value, str) else value[-1]["content"]


def policy_negatives(model, processor, pairs: list[dict], root, source) -> tuple[list[dict], dict]:
    """Pairs built from the policy's own mistakes: each pair's rejected answer becomes the one the
    policy (the SFT model) finds most likely among its question's wrong answers, scored as SFT
    trains it (the answer and EOS after the picture and question). Returns the new pairs and how
    often that changed the rejected answer and how often the policy's favourite answer is wrong.

    Only questions of the built-in image task have a known set of answers; another question is a
    `UserError` naming the pairs file and the row."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from pipelines.tasks import image as task
    from pipelines.tasks.image_data import question_of
    from rto.errors import UserError

    candidates = []
    for n, pair in enumerate(pairs, 1):
        try:
            choices = task.answer_choices(question_of(pair))
        except ValueError:
            raise UserError(
                f"row {n}: dpo.negatives 'policy' needs a question of the image task's kinds (what color is "
                f"the SHAPE ? / what shape is at the PLACE ? / how many COLOR shapes ?), got {question_of(pair)!r}",
                source=str(source),
            ) from None
        candidates.append([c for c in choices if c != _text(pair["chosen"])])
    flat = [{**pair, "candidate": c} for pair, cs in zip(pairs, candidates, strict=True) for c in cs]
    chosen_scores = image_response_logprob_sums(model, processor, pairs, "chosen", root)
    scores = image_response_logprob_sums(model, processor, flat, "candidate", root).tolist()
    out, changed, mistakes, at = [], 0, 0, 0
    for pair, cs, chosen_score in zip(pairs, candidates, chosen_scores.tolist(), strict=True):
        own = scores[at : at + len(cs)]
        at += len(cs)
        worst = max(range(len(cs)), key=own.__getitem__)
        changed += cs[worst] != _text(pair["rejected"])
        mistakes += own[worst] > chosen_score
        out.append({**pair, "rejected": cs[worst]})
    return out, {
        "negatives_changed": changed / len(pairs),
        "policy_prefers_a_wrong_answer": mistakes / len(pairs),
    }


def image_pair_rows(pairs: list[dict], root) -> list[dict]:
    """Image preference records as TRL's vision DPO rows: the picture, the chat-formatted prompt
    (the processor expands its ``<image>``), and each response followed by EOS, as SFT trains it."""
    # deferred: every stage module is imported to validate a job (start-up time)
    from pipelines.tasks import image as task
    from pipelines.tasks.image_data import load_image, question_of

    eos = task.SPECIAL["eos"]
    return [
        {
            "images": [load_image(p["image"], root, source=f"pairs: row {n} 'image'")],
            "prompt": task.prompt_text(question_of(p)),
            "chosen": f" {_text(p['chosen'])} {eos}",
            "rejected": f" {_text(p['rejected'])} {eos}",
        }
        for n, p in enumerate(pairs, 1)
    ]


@no_grad
def image_response_logprob_sums(model, processor, pairs: list[dict], key: str, root, batch_size: int = 64):
    """Σ log π(response | picture, question) of each pair's `key` response (dense VLM forward)."""
    # deferred: every stage module is imported to validate a job (start-up time)
    import torch

    from pipelines.tasks import image as task
    from pipelines.tasks.image_data import encode_prompt
    from prune.adaptinfer.generate import vlm_token_logprobs
    from rto.generation import pack

    eos = task.SPECIAL["eos"]
    sums = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        encoded = [encode_prompt(processor, p, root) for p in chunk]
        responses = [
            processor.tokenizer(f"{_text(p[key])} {eos}", add_special_tokens=False)["input_ids"]
            for p in chunk
        ]
        sequences, mask, prompt_len, response_mask = pack(
            [e[0] for e in encoded], responses, processor.tokenizer.pad_token_id
        )
        pixels = torch.stack([e[1] for e in encoded]).to(model.device)
        logprobs = vlm_token_logprobs(model, sequences.to(model.device), pixels, mask.to(model.device))
        sums.append((logprobs[:, prompt_len - 1 :].cpu() * response_mask).sum(dim=1))
    return torch.cat(sums)


def image_preference_figures(
    policy_path: str, ref_path: str, processor, pairs: list[dict], beta: float, root, device: str
) -> dict:
    """Held-out image pairs: how often the reference (SFT) and the DPO model give the chosen
    response the higher log-likelihood, and how often DPO's implicit reward ranks it first."""

    totals = {}
    for name, path in (("dpo", policy_path), ("ref", ref_path)):
        model = load_vision_lm(path, device=device).eval()
        totals[name] = [
            image_response_logprob_sums(model, processor, pairs, k, root) for k in ("chosen", "rejected")
        ]
        del model
    (pc, pr), (rc, rr) = totals["dpo"], totals["ref"]
    margin = beta * ((pc - rc) - (pr - rr))
    return {
        "ref_prefers_chosen": float((rc > rr).float().mean()),
        "dpo_prefers_chosen": float((pc > pr).float().mean()),
        "dpo_reward_accuracy": float((margin > 0).float().mean()),
        "dpo_reward_margin": float(margin.mean()),
    }
