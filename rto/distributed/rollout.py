"""Rollout worker: a copy of the policy that generates responses, with a pluggable generate function.

Layout of what :meth:`RolloutWorker.generate` returns (the rest of the pipeline relies on it):
``sequences [B, P + R]`` = the left-padded prompt of length P, then the right-padded response of
length R (always ``max_new_tokens``, so shards and steps share one shape); ``attention_mask
[B, P + R]``; ``response_mask [B, R]`` (1 for response tokens up to and including the first EOS);
``sampler_logprobs [B, R]`` (0 where ``response_mask`` is 0). Same layout and names as
``rto.generation.Samples`` and ``rto.forward``.
"""

from __future__ import annotations

from typing import Any

import torch

from rto.distributed.workers import Worker, default_device, resolve_function, weights_checksum
from rto.errors import UserError
from rto.generation import Sampler, hf_generate, kv_cache_kind, response_mask
from rto.models import load_model, model_sampling_token_ids


class RolloutWorker(Worker):
    """Generates rollouts with its own copy of the policy, which receives new weights after each
    update, or (colocated) with the policy engine's module itself.

    Args:
        model_path: the policy's Hugging Face folder (causal LM).
        generate_fn: callable or ``"module:function"`` with :func:`hf_generate`'s signature.
        max_new_tokens, temperature, top_p, top_k: default sampling settings (overridable per call).
        dtype: model dtype (``"bfloat16"`` on GPU).
        seed: sampling seed; rank ``r`` uses ``seed + r``.
        eos_token_id, pad_token_id, suppress_token_ids: the token ids of
            :func:`rto.models.sampling_token_ids` (the one EOS, the pad, what is never sampled);
            by default taken from the tokenizer saved with the model.
        model: instead of ``model_path``, a module to sample with as it is (colocated mode: the
            policy engine's own module, so updates need no weight push).
        generation_cache: the dense sampler's KV cache (:func:`rto.generation.kv_cache_kind`;
            ``ppo.generation_cache``); a pruned ``generate_fn`` keeps its own.
    """

    def __init__(
        self,
        model_path: str | None = None,
        generate_fn: Sampler | str = hf_generate,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        dtype: torch.dtype | str = torch.float32,
        seed: int = 0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        suppress_token_ids: list[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = 1,
        model: torch.nn.Module | None = None,
        generation_cache: str = "auto",
    ) -> None:
        super().__init__(rank, world_size, num_threads)
        kv_cache_kind(generation_cache, "cpu")  # an unknown name fails here, not at the first step
        self.generation_cache = generation_cache
        if (model is None) == (model_path is None):
            raise ValueError("give the rollout worker a model_path or a model to share, not both")
        if model is not None:  # colocated: sample with the trained module itself (its device, its dtype)
            self.model = model
            self.device = next(model.parameters()).device
        else:
            self.device = default_device()
            self.model = load_model(model_path, "causal_lm", dtype).to(self.device).eval()
            self.model.requires_grad_(False)
        self.generate_fn = generate_fn
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.generator_seed = seed + rank
        torch.manual_seed(self.generator_seed)
        tokens = self._token_ids(model_path) if eos_token_id is None else {}
        eos = eos_token_id if eos_token_id is not None else tokens["eos_token_id"]
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = pad_token_id if pad_token_id is not None else tokens.get("pad_token_id")
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        suppress = (
            suppress_token_ids if suppress_token_ids is not None else tokens.get("suppress_token_ids", [])
        )
        self.suppress_token_ids = sorted(set(suppress) | set(self._placeholder_ids()))

    def _token_ids(self, model_path: str) -> dict:
        """The tokenizer's ids (:func:`rto.models.model_sampling_token_ids`); a bare model folder
        without a tokenizer falls back to its generation config (nothing suppressed)."""

        try:
            if model_path is None:
                raise UserError("a shared model has no folder")
            return model_sampling_token_ids(model_path)
        except UserError:
            config = self.model.generation_config
            text = self.model.config.get_text_config()  # a VLM keeps its token ids there
            eos = (
                config.eos_token_id
                if config.eos_token_id is not None
                else getattr(text, "eos_token_id", None)
            )
            pad = (
                config.pad_token_id
                if config.pad_token_id is not None
                else getattr(text, "pad_token_id", None)
            )
            return {"eos_token_id": eos, "pad_token_id": pad}

    def _placeholder_ids(self) -> list[int]:
        """A vision-language policy's image token (the scorers' forward would look for a picture)."""
        image = getattr(self.model.config, "image_token_id", None)
        return [image] if image is not None else []

    def generate(
        self,
        batch: dict[str, torch.Tensor],
        dense: bool = False,
        policy_scores: bool = False,
        **sampling: Any,
    ) -> dict[str, torch.Tensor]:
        """Generate responses for ``batch = {"input_ids": [B, P], "attention_mask": [B, P]}``
        (prompts left-padded; plus ``pixel_values [B, 3, H, W]`` for a vision-language policy).
        ``dense``: sample with the dense policy (:func:`hf_generate`) even when this worker has a pruned
        ``generate_fn``. ``policy_scores``: when the sampler is the dense policy, also return the
        policy pass's ``policy_logprobs`` (T = 1) and ``policy_entropy`` ``[B, R]`` from the sampling
        logits (``sampler_logprobs`` are its log-probs at T). ``sampling`` overrides the
        constructor's settings for this call. Returns CPU tensors in the layout of the module
        docstring."""
        settings = {**self.sampling, **sampling, "suppress_token_ids": self.suppress_token_ids}
        if "pixel_values" in batch:
            settings["pixel_values"] = batch["pixel_values"].to(self.device, self.model.dtype)
        max_new_tokens = settings["max_new_tokens"]
        input_ids = batch["input_ids"].to(self.device)
        prompt_mask = batch["attention_mask"].to(self.device)
        was_training = self.model.training  # a shared (colocated) module is the training engine's
        self.model.eval()
        try:
            with torch.no_grad():
                sampler = hf_generate if dense else resolve_function(self.generate_fn)
                scored = policy_scores and sampler is hf_generate
                if sampler is hf_generate:
                    settings["cache"] = self.generation_cache
                out = sampler(
                    self.model,
                    input_ids,
                    prompt_mask,
                    eos_token_id=self.eos_token_ids or None,
                    pad_token_id=self.pad_token_id,
                    **settings,
                    **({"return_policy_scores": True} if scored else {}),
                )
        finally:
            self.model.train(was_training)
        response_ids, logprobs, extra = out if scored else (*out, {})
        pad = max_new_tokens - response_ids.shape[1]
        response_ids = torch.nn.functional.pad(response_ids, (0, pad), value=self.pad_token_id)
        mask = response_mask(response_ids, self.eos_token_ids)
        mask[:, response_ids.shape[1] - pad :] = 0
        response_ids = torch.where(mask.bool(), response_ids, self.pad_token_id)

        def per_token(values: torch.Tensor) -> torch.Tensor:  # [B, R'] -> [B, R], 0 past each response
            values = torch.nn.functional.pad(values.float(), (0, pad), value=0.0)
            return torch.where(mask.bool(), values, 0.0).cpu()

        return {
            "sequences": torch.cat([input_ids, response_ids], dim=1).cpu(),
            "attention_mask": torch.cat([prompt_mask.long(), mask], dim=1).cpu(),
            "response_mask": mask.cpu(),
            "sampler_logprobs": per_token(logprobs),
            **{f"policy_{name}": per_token(values) for name, values in extra.items()},
        }

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load new policy weights (full state dict, any dtype/device; cast to this model's).
        Through Ray, pass the ObjectRef that :func:`rto.distributed.push_weights` made: Ray resolves
        it to the same shared object in every worker on a node."""
        self.model.load_state_dict(state_dict, strict=True)

    def weights_checksum(self) -> str:
        """See :func:`rto.distributed.workers.weights_checksum`."""
        return weights_checksum(self.model)
