"""AWQ's two searches (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024), independent of where the error is measured.

- :func:`search_scale`: per-input-channel scales ``s = mean|x|^alpha`` (normalized
  around 1) for a group of layers that read the same input; ``alpha`` from a
  20-point grid (0, 0.05, ..., 0.95), the one with the lowest error returned by
  the caller's ``evaluate`` (the output of the whole block, or of the layer).
  ``alpha = 0`` is plain rounding, so the search never does worse than RTN on
  the rows it measures.
- :func:`search_clip`: per (output row, group) shrink of the weight range,
  from 1 down to 0.5 in steps of 0.05, minimizing that group's share of the
  layer output error on sampled input rows.

All maths in fp32. Magnitudes are clamped away from 0 (dead channels) and
non-finite candidates are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from visbatch.core.quantized.weights import QuantizedWeight
from visbatch.core.tasks.quantize.quant import quantize_weight

ALPHA_GRID = 20
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_ROWS = 512


def awq_scale(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x|^alpha``, normalized so that max * min = 1 (AWQ's normalization)."""
    s = magnitude.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_effective_weight(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None, clip: torch.Tensor | None = None
) -> tuple[QuantizedWeight, torch.Tensor]:
    """Quantize ``W diag(s)`` and return it with the effective weight ``Q(W diag(s)) diag(1/s)``."""
    quantized = quantize_weight(weight * scale.view(1, -1), bits, group_size, clip)
    return quantized, quantized.dequantize(torch.float32) / scale.view(1, -1)


def awq_quantize(
    weight: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, bits: int, group_size: int | None, clip: bool
) -> tuple[QuantizedWeight, torch.Tensor]:
    """Round ``W diag(s)``, after the clip search on the input ``rows`` (divided by ``s``) when
    ``clip`` and there are rows; returns the quantized weight and the effective weight."""
    ratios = (
        search_clip(weight * scale.view(1, -1), rows / scale.view(1, -1), bits, group_size)
        if clip and rows is not None and rows.numel()
        else None
    )
    return scaled_effective_weight(weight, scale, bits, group_size, ratios)


def search_scale(
    weights: Sequence[torch.Tensor],
    magnitude: torch.Tensor,
    bits: int,
    group_size: int | None,
    evaluate: Callable[[list[torch.Tensor]], float],
) -> tuple[float, torch.Tensor, float]:
    """(alpha, s, error) for layers with the given fp32 ``weights`` [out, in] sharing one input
    whose per-channel mean magnitude is ``magnitude``. ``evaluate`` takes the layers' effective
    weights and returns the output error they cause."""
    best: tuple[float, torch.Tensor, float] | None = None
    for step in range(ALPHA_GRID):
        alpha = step / ALPHA_GRID
        s = awq_scale(magnitude, alpha)
        if not torch.isfinite(s).all():
            continue
        error = evaluate([scaled_effective_weight(w, s, bits, group_size)[1] for w in weights])
        if best is None or error < best[2]:
            best = (alpha, s, error)
    assert best is not None  # alpha = 0 gives s = 1, always finite
    return best


def search_clip(weight: torch.Tensor, rows: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Clip ratios [out, groups] for ``weight`` [out, in] (already scaled) on input ``rows`` [n, in]
    (already divided by the scales): for each (row, group) the ratio whose rounding error
    ``sum_n (sum_{j in group} (Wq - W)_j x_nj)^2`` is lowest."""
    w = weight.float()
    out_features, in_features = w.shape
    group = in_features if group_size is None else group_size
    groups = -(-in_features // group)
    x = rows.float()[:CLIP_ROWS]
    padded = groups * group
    if padded != in_features:
        x = torch.nn.functional.pad(x, (0, padded - in_features))
    x = x.view(x.shape[0], groups, group)  # [n, G, g]
    best_ratio = torch.ones(out_features, groups)
    best_error = torch.full((out_features, groups), float("inf"))
    for step in range(int(CLIP_GRID * CLIP_MAX_SHRINK) + 1):
        ratio = 1 - step / CLIP_GRID
        clip = torch.full((out_features, groups), ratio)
        difference = quantize_weight(w, bits, group_size, clip).dequantize() - w
        if padded != in_features:
            difference = torch.nn.functional.pad(difference, (0, padded - in_features))
        partial = torch.einsum("ogj,ngj->ogn", difference.view(out_features, groups, group), x)
        error = partial.pow(2).mean(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, clip, best_ratio)
    return best_ratio
