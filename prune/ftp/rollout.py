"""FTP-pruned generation for PPO rollout workers.

`RolloutWorker` calls `generate_fn(model, input_ids, attention_mask, *, max_new_tokens, temperature,
top_p, top_k, eos_token_id, pad_token_id, suppress_token_ids) -> (response_ids, sampler_logprobs)`.
This one samples with the FTP router of an `ftp` stage; the router is kept while the policy weights
are refreshed after every PPO update (it reads the model's current weights on each call). The
sampler log-probs it returns are those of the pruned model at temperature T, before truncation, so
PPO can weight each token by min(π_dense/π_sampler, C).
"""

from __future__ import annotations

from pathlib import Path

from prune.samplers import register_sampler


class FTPGenerate:
    """A picklable generate function bound to an `ftp` stage folder (sent to Ray workers)."""

    def __init__(self, ftp_dir: str):
        self.ftp_dir = str(ftp_dir)
        self._loaded: tuple | None = None

    def _router(self, model):
        if self._loaded is None or self._loaded[0] is not model:
            from prune.ftp.router import load_router  # deferred: torch (the sampler registry loads light)

            router, schedule, meta = load_router(self.ftp_dir, model)
            threshold = meta.get("decode_thresholds", meta.get("decode_threshold", 0.5))
            self._loaded = (model, router, schedule, threshold, int(meta.get("attention_probes", 8)))
        return self._loaded[1:]

    def __getstate__(self):
        return {"ftp_dir": self.ftp_dir, "_loaded": None}

    def __call__(
        self, model, input_ids, attention_mask, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        eos_token_id=None, pad_token_id=None, suppress_token_ids=None, pixel_values=None,
    ):  # fmt: skip
        import torch  # deferred: the sampler registry loads without torch

        from prune.ftp.generate import generate_pruned  # deferred: torch
        from rto.generation import bare_generation_config  # deferred: torch

        if pixel_values is not None:
            raise ValueError("FTP samples text policies; this batch has pictures")
        router, schedule, threshold, n_probes = self._router(model)
        if hasattr(router, "to"):
            router.to(input_ids.device)
        logprobs: list[torch.Tensor] = []
        sampling = temperature > 0
        with torch.no_grad(), bare_generation_config(model):  # none of the checkpoint's settings
            sequences = generate_pruned(
                model, router, schedule, input_ids, attention_mask, threshold=threshold, n_probes=n_probes,
                logprobs_out=logprobs, suppress_token_ids=suppress_token_ids, max_new_tokens=max_new_tokens,
                do_sample=sampling, temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                top_k=top_k if sampling else None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            )  # fmt: skip
        response_ids = sequences[:, input_ids.shape[1] :]
        return response_ids, torch.stack(logprobs, dim=1)[:, : response_ids.shape[1]]


def make_generate_fn(ftp_dir) -> FTPGenerate:
    return FTPGenerate(ftp_dir)


@register_sampler("ftp", policies="text", stage="ftp")
def ftp_sampler(job, policy: str, stage_dir: Path | None) -> FTPGenerate:
    """Rollouts from the policy with the `ftp` stage's token router (checked against the policy,
    its tokenizer and the job's task here, in the driver, before any actor starts)."""
    from prune.ftp.router import check_router_folder, task_identity  # deferred: torch

    check_router_folder(stage_dir, policy, task_identity(job))
    return FTPGenerate(stage_dir)
