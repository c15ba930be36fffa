"""The FTP router: which tokens each decoder block computes.

A *scorer* maps the routing state of one block to a keep-logit per token; a *rule* turns logits
into decisions: the top-k tokens of each row in prefill (exactly the block's target sparsity; the
first token is always kept), a threshold on sigmoid(logit) for the single new token in decoding.

Scorers: `static` (the bootstrap: first token, then tokens from the end backwards), `learned` (one
2-layer MLP on the four factors, shared by all blocks), `random` (a baseline).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prune.ftp.factors import N_FACTORS, router_factors
from rto.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_META = "ftp.json"


def text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def check_supported(model) -> None:
    """Raise UserError unless `model` is a Llama-family causal LM FTP can route."""
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"architecture {model_type!r} is not supported by FTP (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
            field="model.config.model_type",
        )
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa"):
        raise UserError(
            f"attention implementation {impl!r} is not supported by FTP (use 'sdpa' or 'eager')",
            field="model.config.attn_implementation",
        )


def model_fingerprint(model) -> dict:
    """What a router file must match: architecture, depth and width of the model."""
    return config_fingerprint(text_config(model))


def config_fingerprint(config) -> dict:
    """`model_fingerprint` from a (text) model config alone, without loading the weights."""
    return {
        "model_type": config.model_type,
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
    }


def tokenizer_fingerprint(tokenizer) -> dict:
    """What a router file must match in the policy's tokenizer: its size and its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
    return {"vocab_size": len(tokenizer), "vocab_sha256": digest}


def task_identity(job) -> dict | None:
    """The job's built-in task and variant (None for external data), recorded with a router."""
    task = getattr(job, "task", None)
    if task is None:
        return None
    return {"name": task.name, "variant": getattr(task, "variant", None)}


def check_router_folder(path: str | Path, policy: str, task: dict | None = None) -> dict:
    """Refuse, before any model is loaded or actor started, a router folder made for another model
    (architecture, depth, width), another tokenizer or another task variant than `policy`'s and
    `task`'s; returns the folder's metadata. Folders from before tokenizer and task were recorded
    are checked on what they record."""
    # deferred: the config and tokenizer stack load only when a router folder is checked
    from transformers import AutoConfig

    from rto.models import load_tokenizer

    meta_file = Path(path) / ROUTER_META
    meta = read_meta(Path(path))
    config = AutoConfig.from_pretrained(policy)
    theirs = meta["fingerprint"]
    ours = config_fingerprint(getattr(config, "text_config", None) or config)
    if "tokenizer" in meta:
        theirs = {**theirs, **meta["tokenizer"]}
        ours.update(tokenizer_fingerprint(load_tokenizer(policy)))
    if "task" in meta and task is not None and meta["task"] is not None:
        theirs = {**theirs, **{f"task {k}": v for k, v in meta["task"].items()}}
        ours.update({f"task {k}": v for k, v in task.items()})
    differ = [key for key in ours if key in theirs and theirs[key] != ours[key]]
    if differ:
        what = "; ".join(f"{key} {theirs[key]!r} (the policy's: {ours[key]!r})" for key in differ)
        raise UserError(
            f"this FTP router was made for another {'task' if differ[0].startswith('task') else 'model'} "
            f"than policy {policy}: {what}; run the ftp stage again for this policy",
            source=str(meta_file),
            field=differ[0].replace("task ", "task."),
        )
    return meta


class Router(nn.Module):
    """One MLP (4 -> hidden -> 2) shared by all blocks; outputs (skip, keep) logits per token."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        self.mlp = nn.Sequential(nn.Linear(N_FACTORS, hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, factors: torch.Tensor) -> torch.Tensor:
        """factors [..., 4] -> keep-logit [...] (log-odds of keeping the token)."""
        skip_keep = self.mlp(factors)
        return skip_keep[..., 1] - skip_keep[..., 0]


@dataclass
class RouteState:
    """What a scorer sees at one block, for the tokens being routed (all [B, T])."""

    layer: int
    sparsity: float
    rel_pos: torch.Tensor
    attn_score: torch.Tensor
    attn_rank: torch.Tensor
    valid: torch.Tensor
    is_first: torch.Tensor


def static_logits(state: RouteState) -> torch.Tensor:
    """Bootstrap router: prefer the latest tokens (the first one is forced by the rule)."""
    return 8.0 * (state.rel_pos - state.sparsity)


def random_logits(state: RouteState, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each token with probability 1 - sparsity (logistic noise around the log-odds)."""
    s = min(max(state.sparsity, 1e-6), 1 - 1e-6)
    u = torch.rand(state.rel_pos.shape, generator=generator, device="cpu").to(state.rel_pos.device)
    u = u.clamp(1e-6, 1 - 1e-6)
    return math.log((1 - s) / s) + torch.log(u) - torch.log1p(-u)


def make_scorer(router: Router | str, generator: torch.Generator | None = None):
    """-> (scorer(state) -> keep-logits [B, T], whether it needs the attention table)."""
    if isinstance(router, Router):
        return (
            lambda st: router(router_factors(st.rel_pos, st.attn_score, st.attn_rank, st.sparsity)),
            True,
        )
    if router == "static":
        return static_logits, False
    if router == "random":
        return (lambda st: random_logits(st, generator)), False
    raise ValueError(f"unknown router {router!r}; expected a Router, 'static' or 'random'")


def select_topk(
    logits: torch.Tensor, valid: torch.Tensor, force: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Keep round((1 - sparsity) * n_valid) tokens per row (at least one), forced ones first."""
    n_valid = valid.sum(1)
    n_keep = torch.round((1.0 - sparsity) * n_valid).long().clamp(min=1)
    score = logits.detach().masked_fill(~valid, float("-inf")).masked_fill(force & valid, float("inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(logits.shape[1], device=logits.device).expand_as(order))
    return (ranks < n_keep[:, None]) & valid


def select_threshold(logits: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Decode rule: keep a token when sigmoid(logit) > threshold (threshold 0 keeps every token)."""
    if threshold <= 0:
        return valid.clone()
    return (torch.sigmoid(logits.detach()) > threshold) & valid


def save_router(
    out_dir: str | Path,
    router: Router,
    schedule: list[float],
    fingerprint: dict,
    kind: str = "learned",
    **meta,
) -> None:
    """Write `router.safetensors` and `ftp.json` (fingerprint, schedule, kind, settings) into `out_dir`.

    `kind` "static" records that rollouts should use the static router (the weights are unused)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}, out / ROUTER_WEIGHTS
    )
    record = {
        "fingerprint": fingerprint,
        "kind": kind,
        "schedule": [float(s) for s in schedule],
        "hidden": router.hidden,
        **meta,
    }
    (out / ROUTER_META).write_text(json.dumps(record, indent=2))


def read_meta(folder: Path) -> dict:
    """A router folder's `ftp.json`, checked for the fields every reader needs."""
    meta_file = folder / ROUTER_META
    if not meta_file.is_file() or not (folder / ROUTER_WEIGHTS).is_file():
        raise UserError(
            f"not an FTP router folder (needs {ROUTER_META} and {ROUTER_WEIGHTS})", source=str(folder)
        )
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta["fingerprint"], dict):
            raise TypeError("fingerprint is not a mapping")
        list(meta["schedule"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"unreadable router metadata ({exc})", source=str(meta_file)) from exc
    return meta


def load_router(path: str | Path, model=None) -> tuple[Router | str, list[float], dict]:
    """Load a router folder -> (Router, or "static" for a static-router folder; schedule; metadata).

    With `model`, check that the folder was made for this model (architecture, depth, width)."""
    from safetensors.torch import load_file

    folder = Path(path)
    meta_file = folder / ROUTER_META
    meta = read_meta(folder)
    fingerprint, schedule = meta["fingerprint"], list(meta["schedule"])
    if model is not None:
        check_supported(model)
        expected = model_fingerprint(model)
        for key, value in expected.items():
            if fingerprint.get(key) != value:
                raise UserError(
                    f"router was trained for a model with {key}={fingerprint.get(key)!r}, this model has {value!r}",
                    source=str(meta_file),
                    field=f"fingerprint.{key}",
                )
    if len(schedule) != fingerprint.get("num_hidden_layers"):
        raise UserError(
            "schedule length does not match num_hidden_layers", source=str(meta_file), field="schedule"
        )
    if meta.get("kind", "learned") == "static":
        return "static", schedule, meta
    router = Router(hidden=int(meta.get("hidden", 64)))
    router.load_state_dict(load_file(folder / ROUTER_WEIGHTS))
    return router.eval(), schedule, meta
