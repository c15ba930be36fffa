"""Pruning schedules: decoder layer -> vision tokens kept after that layer.

Paper presets (LLaVA-1.5-7B: 32 layers, 576 vision tokens, pruning after 0-based layers 1, 10 and
20), taken from the official code (weiczh02/AdaptInfer-base, `score.py`, "ours 7b"):

    budget 128: 290 / 72 / 18      budget 64: 133 / 27 / 3
    budget  48:  80 / 24 / 2       budget 32:  40 / 12 / 0

The budget label is the paper's count, (576·1 + 9·k1 + 10·k2 + 12·k3) / 32 — i.e. it counts one
full layer before the first cut (e.g. 64 -> 64.97). The code prunes after 0-based layer 1, so two
layers see all 576 tokens and the strict per-layer mean, `mean_vision_tokens`, is higher
(budget 64 -> 82.9 tokens per layer). Budget 192 is not in the official code; we derive it the
same way as the others relate: the 128 preset's shape scaled so that the paper's count is 192,
c = (32·192 − 576) / (9·290 + 10·72 + 12·18) = 1.570 -> 455 / 113 / 28.

For other models and budgets, `proportional_schedule` keeps the paper's shape: cut layers at the
same relative depths (1/32, 10/32, 20/32 of the stack) and keep counts proportional to 133:27:3,
scaled so that the strict per-layer mean equals the requested budget.
"""

from __future__ import annotations

from rto.errors import UserError

PAPER_LAYERS = (1, 10, 20)
PAPER_N_LAYERS = 32
PAPER_N_VISION = 576
PAPER_SHAPE = (133, 27, 3)

PRESETS: dict[str, dict[int, int]] = {
    "llava-1.5-192": dict(zip(PAPER_LAYERS, (455, 113, 28), strict=True)),  # derived, see above
    "llava-1.5-128": dict(zip(PAPER_LAYERS, (290, 72, 18), strict=True)),
    "llava-1.5-64": dict(zip(PAPER_LAYERS, (133, 27, 3), strict=True)),
    "llava-1.5-48": dict(zip(PAPER_LAYERS, (80, 24, 2), strict=True)),
    "llava-1.5-32": dict(zip(PAPER_LAYERS, (40, 12, 0), strict=True)),
}


def mean_vision_tokens(schedule: dict[int, int], n_layers: int, n_vision: int) -> float:
    """Strict mean over decoder layers of the vision tokens each layer computes."""
    total, present, cuts = 0, n_vision, dict(schedule)
    for layer in range(n_layers):
        total += present
        present = cuts.get(layer, present)
    return total / n_layers


def scaled_layers(n_layers: int, anchors: tuple[int, ...] = PAPER_LAYERS) -> list[int]:
    """The paper's cut layers at the same relative depth in an `n_layers` stack (distinct, increasing)."""
    out: list[int] = []
    for anchor in anchors:
        layer = min(max(round(anchor * n_layers / PAPER_N_LAYERS), 0), n_layers - 1)
        if out and layer <= out[-1]:
            layer = out[-1] + 1
        if layer < n_layers:
            out.append(layer)
    return out


def proportional_schedule(
    n_layers: int,
    n_vision: int,
    mean_keep: float,
    layers: list[int] | None = None,
    shape: tuple[float, ...] = PAPER_SHAPE,
) -> dict[int, int]:
    """Counts c·shape at `layers` (default: `scaled_layers`) whose strict per-layer mean is `mean_keep`.

    Layers 0..layers[0] compute all tokens, so `mean_keep` must be at least
    (layers[0] + 1) · n_vision / n_layers; a smaller budget is a `UserError`.
    """
    layers = list(layers) if layers is not None else scaled_layers(n_layers)
    if len(layers) != len(shape):
        raise UserError(f"{len(layers)} cut layers but a shape of {len(shape)} counts", field="schedule")
    ends = [*layers[1:], n_layers - 1]
    spans = [end - start for start, end in zip(layers, ends, strict=True)]
    floor = (layers[0] + 1) * n_vision / n_layers
    if mean_keep < floor:
        raise UserError(
            f"a mean of {mean_keep:g} vision tokens per layer is below the {floor:g} that layers "
            f"0..{layers[0]} already compute",
            field="keep_ratio",
        )

    def counts_for(scale: float, rounded: bool) -> list[float]:
        out, present = [], float(n_vision)
        for p in shape:
            present = min(present, max(0.0, round(scale * p) if rounded else scale * p))
            out.append(present)
        return out

    def mean_for(counts: list[float]) -> float:
        return (floor * n_layers + sum(s * c for s, c in zip(spans, counts, strict=True))) / n_layers

    low, high = 0.0, float(n_vision) / min(p for p in shape if p > 0)
    for _ in range(60):  # the mean is monotone in the scale: bisect, then round
        mid = (low + high) / 2
        low, high = (mid, high) if mean_for(counts_for(mid, False)) < mean_keep else (low, mid)
    counts = [int(c) for c in counts_for(low, True)]
    return dict(zip(layers, counts, strict=True))
