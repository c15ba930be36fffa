"""The image task's tiny LLaVA (CLIP vision tower + Llama), its SFT loop and its evaluation.

The model is transformers' own `LlavaForConditionalGeneration` built from configs, so it saves and
loads with `save_pretrained` / `from_pretrained` and every Llava-family code path (ours included)
treats it like LLaVA-1.5: 64 vision tokens per picture instead of 576, 12 decoder layers instead
of 32.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pipelines.tasks import image as task
from prune.adaptinfer.engine import attention_mask_for, image_embeddings, select_rows

TINY_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=task.IMAGE_SIZE,
    patch_size=task.PATCH_SIZE,
    projection_dim=64,
)
"""CLIP vision tower of the built-in VLM."""

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
"""Llama language model of the built-in VLM (12 layers so that pruning schedules have room)."""


def llava_config(tokenizer, vision: dict | None = None, text: dict | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_TEXT, **(text or {})},
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**{**TINY_VISION, **(vision or {})}),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(task.SPECIAL["image"]),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def build_model(tokenizer, seed: int = 0, **overrides):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(tokenizer, **overrides))
    # transformers initialises the projector with std 0.02, which makes the image tokens of this
    # tiny tower almost constant (std ~0.004 across tokens) and SFT then never leaves the
    # answer prior; PyTorch's default init keeps their spread comparable to the text embeddings.
    for module in model.model.multi_modal_projector.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def object_tokens(pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N_VISION_TOKENS) bool: the patches that show part of an object (not plain background).

    A background patch is one colour; every glyph leaves some background pixels in its patch, so
    an object patch is exactly one whose pixels are not all equal (whatever the background colour).
    """
    b = pixel_values.shape[0]
    g = task.IMAGE_SIZE // task.PATCH_SIZE
    patches = pixel_values.reshape(b, 3, g, task.PATCH_SIZE, g, task.PATCH_SIZE)
    spread = patches.amax(dim=(3, 5)) - patches.amin(dim=(3, 5))  # (B, 3, g, g)
    return (spread.amax(1) > 1e-4).reshape(b, g * g)


def patch_labels(tokenizer, examples: list[task.Example]) -> torch.Tensor:
    """(B, N_VISION_TOKENS, 2) word ids (shape, colour) of the object in each patch; -100 elsewhere."""
    labels = torch.full((len(examples), task.N_VISION_TOKENS, 2), -100, dtype=torch.long)
    for b, example in enumerate(examples):
        for index, item in task.object_tokens_of(example).items():
            labels[b, index] = torch.tensor(tokenizer.convert_tokens_to_ids([item.shape, item.color]))
    return labels


def patch_loss(model, logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Auxiliary grounding loss: the LM head at each object's image token names its shape and colour
    (`patch_labels`, half the target mass each); background tokens are not supervised."""
    vision = input_ids == model.config.image_token_id
    picked = logits[vision].float().log_softmax(-1)  # (B * N, V), row-major like `labels`
    flat = labels.reshape(-1, labels.shape[-1])
    rows = flat[:, 0] >= 0
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return -picked[rows].gather(1, flat[rows]).mean()


def loss_with_dropped_vision_tokens(
    model,
    batch: dict,
    keep: int,
    generator: torch.Generator,
    keep_objects: bool = False,
    cuts: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """SFT loss with only `keep` image tokens per sample left in the sequence.

    Token-drop augmentation: a tiny model trained densely reads the image partly through attention
    *shares* (e.g. how much of the image is red, or how much attention the object gets against
    the background), which any vision-token pruning distorts; large VLMs park most attention on
    sink tokens and are far less sensitive. Training on thinned images removes that artefact for
    every pruning method alike. With `keep_objects` the dropped tokens are background only (the
    object patches, at most `keep` of them, are always kept), so the answer stays determined by
    the picture and the model is not taught to guess; otherwise the `keep` are uniformly random.
    Kept tokens keep their positions.

    `cuts` generalises the drop to decoder layers: ``[(layer, keep), ...]`` (distinct layers,
    non-increasing keeps; layer -1 is the input) thins the image tokens *after* each layer, as a
    pruning schedule does (`keep` is then unused). Which tokens go is decided by the same ranking
    at every cut (objects first with `keep_objects`, otherwise random) — no pruning method's
    scorer, so the model learns that the object tokens suffice and that later layers may see few
    of them, as large VLMs do (their text tokens have read the picture within the first layers),
    for every method alike.
    """

    cuts = dict(cuts) if cuts is not None else {-1: keep}  # layer -> image tokens kept after it
    embeds, vision = image_embeddings(model, batch["input_ids"], batch["pixel_values"])
    scores = torch.rand(vision.shape, generator=generator)
    if keep_objects:
        bonus = torch.zeros(vision.shape).masked_scatter(vision, object_tokens(batch["pixel_values"]).float())
        scores = scores + bonus  # objects first, then random background
    scores = scores.masked_fill(~vision, 3.0)  # text always kept
    n_text = int((~vision[0]).sum())
    lm = model.model.language_model
    hidden, valid = embeds, batch["attention_mask"].bool()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    labels = batch["labels"]

    def thin(n_keep, hidden, valid, positions, labels, scores):
        order = select_rows(
            torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(n_keep, dim=-1).indices, True)
        )[0]
        take = lambda t: t.gather(1, order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        return take(hidden), take(valid), take(positions), take(labels), take(scores)

    if -1 in cuts:
        hidden, valid, positions, labels, scores = thin(
            n_text + cuts[-1], hidden, valid, positions, labels, scores
        )
    position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
    for index, layer in enumerate(lm.layers):
        mask = attention_mask_for(lm.config, valid, hidden.shape[1], hidden.dtype)
        hidden = layer(
            hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=positions
        )
        if index in cuts:
            hidden, valid, positions, labels, scores = thin(
                n_text + cuts[index], hidden, valid, positions, labels, scores
            )
            position_embeddings = lm.rotary_emb(hidden, position_ids=positions)
    logits = model.lm_head(lm.norm(hidden))[:, :-1].float()
    labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def log_uniform_keep(generator: torch.Generator) -> int:
    """A number of image tokens to keep, log-uniform in [3, 64): small budgets as often as large
    ones, and never fewer than the (at most 3) object patches."""
    u = float(torch.rand((), generator=generator))
    return min(int(3 * (task.N_VISION_TOKENS / 3) ** u), task.N_VISION_TOKENS - 1)


def random_cuts(n_layers: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """A random pruning-like schedule for `loss_with_dropped_vision_tokens(cuts=...)`.

    One early cut (input or layers 0-3) keeping a log-uniform 3..63 tokens (at least the objects),
    and, half the time, a later cut keeping 0..that many: by then the text tokens must have read
    what they need from the picture.
    """

    def uniform(low: int, high: int) -> int:  # inclusive
        return int(torch.randint(low, high + 1, (), generator=generator))

    first = uniform(-1, min(3, n_layers - 2))
    keep = log_uniform_keep(generator)
    cuts = [(first, keep)]
    if first < n_layers - 2 and float(torch.rand((), generator=generator)) < 0.5:
        cuts.append((uniform(first + 1, n_layers - 2), uniform(0, keep)))
    return cuts


def early_read_cuts(generator: torch.Generator, last_layer: int = 1) -> list[tuple[int, int]]:
    """Every image token removed after a random layer in 0..`last_layer`: the text tokens must
    read the picture within the first layers, whichever patches a pruner would keep."""
    return [(int(torch.randint(0, last_layer + 1, (), generator=generator)), 0)]


def sft(
    out_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    describe_fraction: float = 0.5,
    n_train: int = 16000,
    seed: int = 0,
    log_every: int = 100,
    n_eval: int = 512,
    init: str | Path | None = None,
    token_drop: float = 0.0,
    keep_objects: bool = False,
    model_shape: dict | None = None,
    patch_loss_weight: float = 0.0,
    layer_drop: float = 0.0,
    early_read: float = 0.0,
    careless: float = 0.0,
) -> dict:
    """Supervised fine-tuning on the task (loss on the answer and EOS); saves model + processor.

    A `describe_fraction` of the training examples asks for a full description of the picture:
    dense supervision (every object's colour, shape and place) without which this tiny model stays
    at the answer prior for many hundred steps. A plain loop: TRL's SFTTrainer adds nothing here
    (single-turn, fixed-format data) and a hand-written loop keeps CPU runs short. Returns a
    summary dict with the held-out QA accuracy.

    `n_train=0` draws fresh examples every step instead of sampling a fixed set of `n_train`.
    `token_drop`: the share of batches trained with only some image tokens
    (`loss_with_dropped_vision_tokens`; `keep_objects`: background patches only, a log-uniform
    number kept). `model_shape`: `build_model` overrides (``vision=``, ``text=``).
    `patch_loss_weight`: weight of the auxiliary `patch_loss` (0: off).
    `layer_drop`: the share of batches trained with image tokens thinned after random decoder
    layers (`random_cuts`, objects ranked first), after the `token_drop` share.
    `early_read`: the share of batches with every image token removed after layer 0 or 1
    (`early_read_cuts`), after the `layer_drop` share.
    `careless`: the share of colour, shape and count answers a careless annotator gives without looking
    (`task.careless`); the pictures, the descriptions and the auxiliary loss stay right.
    """
    processor = task.build_processor()
    if init is not None:  # continue from a saved model (same processor)
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init)
    else:
        model = build_model(processor.tokenizer, seed=seed, **(model_shape or {}))
    fresh = not n_train  # 0 / None: new examples every step (no fixed training set to overfit)
    if not fresh:
        train_examples = task.careless(
            task.make_examples(n_train, seed + 1, describe_fraction), careless, seed
        )
        data = task.encode(processor, train_examples, with_answer=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        if fresh:
            examples = task.careless(
                task.make_examples(batch_size, (seed + 1) * 1_000_003 + step, describe_fraction),
                careless,
                seed * 1_000_003 + step,
            )
            batch = task.encode(processor, examples, with_answer=True)
        else:
            idx = torch.randint(0, n_train, (batch_size,), generator=generator)
            batch = {k: v[idx] for k, v in data.items()}
            examples = [train_examples[i] for i in idx.tolist()]
        draw = float(torch.rand((), generator=generator)) if (token_drop or layer_drop or early_read) else 1.0
        if token_drop + layer_drop <= draw < token_drop + layer_drop + early_read:
            loss = loss_with_dropped_vision_tokens(
                model, batch, 0, generator, cuts=early_read_cuts(generator)
            )
        elif token_drop <= draw < token_drop + layer_drop:
            cuts = random_cuts(model.config.text_config.num_hidden_layers, generator)
            loss = loss_with_dropped_vision_tokens(model, batch, 0, generator, keep_objects=True, cuts=cuts)
        elif draw < token_drop:
            if keep_objects:
                keep = log_uniform_keep(generator)
            else:
                keep = int(torch.randint(2, task.N_VISION_TOKENS, (), generator=generator))
            loss = loss_with_dropped_vision_tokens(model, batch, keep, generator, keep_objects=keep_objects)
        else:
            out = model(**batch)
            loss = out.loss
            if patch_loss_weight:
                labels = patch_labels(processor.tokenizer, examples)
                loss = loss + patch_loss_weight * patch_loss(model, out.logits, batch["input_ids"], labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            model.eval()
            accuracy = evaluate(model, processor, task.make_examples(64, seed=seed + 3))
            model.train()
            print(
                f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                f"accuracy@64 {accuracy:.3f}",
                flush=True,
            )
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    summary = {
        "steps": steps,
        "final_loss": sum(losses[-50:]) / min(50, len(losses)),
        "seconds": time.perf_counter() - start,
    }
    summary["accuracy"] = evaluate(model, processor, task.make_examples(n_eval, seed=seed + 2))
    return summary


@torch.no_grad()
def evaluate(model, processor, examples: list[task.Example], batch_size: int = 64, generate=None) -> float:
    """Mean ground-truth reward of greedy answers; `generate(model, batch)` defaults to HF generate."""
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = task.encode(processor, chunk)
        if generate is None:
            out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        else:
            out = generate(model, batch)
        texts = processor.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=False
        )
        total += sum(
            task.reward(t.replace(task.SPECIAL["pad"], " "), e.answer)
            for t, e in zip(texts, chunk, strict=True)
        )
    return total / len(examples)


def tiny_random_vlm(seed: int = 0, n_layers: int = 4, attn_implementation: str = "sdpa"):
    """(model, processor): an untrained, even smaller VLM with spread-out logits, for tests."""
    processor = task.build_processor()
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = build_model(processor.tokenizer, seed=seed, text=text, vision=vision)
    model.set_attn_implementation(attn_implementation)
    return model.eval(), processor


RECIPE = dict(
    steps=3000,
    batch_size=32,
    lr=3e-3,
    describe_fraction=0.6,
    n_train=0,
    seed=5,
    token_drop=0.3,
    keep_objects=True,
    model_shape=dict(vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3)),
    patch_loss_weight=0.0,
)
"""Phase 1 of the benchmark model's recipe (`sft_recipe`): fresh examples every step (a fixed set of
16 000 pictures was memorised: training loss fell while held-out accuracy stayed at ~0.5), 60 %
descriptions, background-only token drop on 30 % of the batches, a 3-layer 128-wide vision tower."""

RECIPE_PHASE2 = dict(
    RECIPE, steps=1800, lr=1.5e-3, describe_fraction=0.3, seed=6, model_shape=None, patch_loss_weight=1.0
)
"""Phase 2 (from phase 1): more questions, lower learning rate, and the auxiliary `patch_loss`
(shape and colour)."""

RECIPE_PHASE3 = dict(RECIPE_PHASE2, steps=1200, lr=1e-3, seed=5, token_drop=0.1, layer_drop=0.7)
"""Phase 3 (from phase 2): 70 % of the batches thinned after random decoder layers (`random_cuts`,
object tokens ranked first at every cut). Large VLMs read the picture into the text tokens within
their first layers; a tiny model trained densely keeps consulting it to its last layer, so that
any pruning after the early layers costs it accuracy. Seed 5 (phase 1's example stream again)."""

RECIPE_PHASE4 = dict(RECIPE_PHASE3, steps=1500, layer_drop=0.6, patch_loss_weight=0.0)
"""Phases 4 and 5 (each from the one before, the same settings and example stream): 60 % layer
drop, no auxiliary loss."""

RECIPE_PHASE6 = dict(RECIPE_PHASE4, lr=3e-4, seed=12)
"""Phase 6: phase 4's settings at a third of the learning rate, fresh examples (seed 12)."""

RECIPE_PHASE7 = dict(RECIPE_PHASE6, lr=1e-3, seed=13, layer_drop=0.3, early_read=0.4)
"""Phase 7: **early reading**. 40 % of the batches lose every image token after layer 0 or 1
(`early_read_cuts`, no ranking at all), so the text tokens must read the picture in the first
layers; 30 % layer drop and 10 % token drop as before. Up to phase 6 the object tokens survived
every training cut, so nothing asked the first layers' text queries to find them."""

RECIPE_PHASE8 = dict(RECIPE_PHASE7, lr=3e-4, seed=14)
"""Phase 8: phase 7's settings at a third of the learning rate, fresh examples (seed 14)."""

PHASES = (
    RECIPE,
    RECIPE_PHASE2,
    RECIPE_PHASE3,
    RECIPE_PHASE4,
    RECIPE_PHASE4,
    RECIPE_PHASE6,
    RECIPE_PHASE7,
    RECIPE_PHASE8,
)
"""The benchmark model's recipe, one `sft` call per phase, each from the previous one's model."""

CARELESS_PHASES = (dict(RECIPE, careless=0.6), dict(RECIPE_PHASE2, careless=0.6))
"""A model that can see but was taught by a careless annotator (`python -m pipelines.tasks.image_model
OUT_DIR --careless`): the benchmark recipe's first two phases (what the picture shows, from
descriptions and the auxiliary patch loss) with 60 % of the colour, shape and count answers "red",
"nothing" and "zero" whatever the picture shows. What its demonstrations got wrong, the ground truth sees: the
start policy of the image PPO benchmark (docs/vision-language.md)."""


def sft_recipe(out_dir: str | Path, log_every: int = 250, phases: tuple[dict, ...] | None = None) -> dict:
    """Train the benchmark model into `out_dir`: the `phases` (default `PHASES`) in turn, phase i into
    `out_dir/phase{i}` and the last into `out_dir` itself. A phase whose folder already holds a
    model is reused, so an interrupted recipe continues where it stopped.

    About 80 minutes on one free CPU core (0.25-0.4 s a step, 13 500 steps), longer on a loaded
    machine.
    """
    out_dir = Path(out_dir)
    phases = PHASES if phases is None else phases
    summaries: dict = {}
    previous = None
    for index, recipe in enumerate(phases, start=1):
        target = out_dir if index == len(phases) else out_dir / f"phase{index}"
        if (target / "config.json").exists():
            print(f"phase {index}: reusing {target}", flush=True)
            summaries[f"phase{index}"] = "reused"
        else:
            print(f"phase {index}: training into {target}", flush=True)
            summaries[f"phase{index}"] = sft(target, init=previous, log_every=log_every, **recipe)
        previous = target
    return summaries


if __name__ == "__main__":  # python -m pipelines.tasks.image_model OUT_DIR [--careless]
    import sys

    careless_annotator = "--careless" in sys.argv[2:]
    print(sft_recipe(sys.argv[1], phases=CARELESS_PHASES if careless_annotator else PHASES))
