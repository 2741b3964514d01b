"""Group-wise asymmetric integer quantization of weight matrices: the pure maths.

A weight ``W`` [out, in] is split along ``in`` into groups of ``group_size``
columns (``in`` for per-channel). Each (row, group) gets a scale and an
integer zero point: ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``,
``w ~ (q - zero) * scale``, with ``scale = (max - min) / (2^bits - 1)`` and
``zero = round(-min / scale)``, where the range [min, max] always includes 0
(so the zero point is in range and 0 is exact; a constant group is exact).
Scales never go below fp16's smallest normal number, the precision they are
stored in (see :func:`storable_scale`).
All maths run in fp32; an all-zero group gets scale 1 and dequantizes to 0.
int4 values are packed two per byte (low nibble first).
"""

from __future__ import annotations

import torch

from visbatch.core.errors import UsageError
from visbatch.core.quantized.weights import QuantizedWeight, pack_int4


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None, clip: torch.Tensor | None = None
) -> QuantizedWeight:
    """Asymmetric group-wise quantization (see module docstring). ``group_size=None``: per channel.

    ``clip`` [out, groups] in (0, 1] shrinks each group's range [min, max] before rounding
    (AWQ's clipping: values outside saturate, the rest get a finer step)."""
    if bits not in (4, 8):
        raise UsageError("bits must be 4 or 8")
    w = weight.detach().float()
    out_features, in_features = w.shape
    group = in_features if group_size is None else int(group_size)
    if group < 1:
        raise UsageError("group size must be positive")
    groups = -(-in_features // group)
    padded = groups * group
    if padded != in_features:
        # Pad with each row's first value so that padding never widens a group's range.
        w = torch.cat([w, w[:, :1].expand(out_features, padded - in_features)], dim=1)
    grouped = w.view(out_features, groups, group)
    # The range always includes 0: zero points stay in range and 0 is exact.
    lo = grouped.amin(dim=-1).clamp(max=0)
    hi = grouped.amax(dim=-1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    levels = 2**bits - 1
    scale = storable_scale(hi - lo, levels)
    zero = torch.round(-lo / scale).clamp(0, levels)
    q = torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    q = q.clamp(0, levels).to(torch.uint8).view(out_features, padded)[:, :in_features]
    packed = pack_int4(q) if bits == 4 else q.contiguous()
    return QuantizedWeight(
        packed, scale.contiguous(), zero.to(torch.uint8).contiguous(), bits, group, (out_features, in_features)
    )


FP16_MIN_NORMAL = 2.0**-14


def storable_scale(span: torch.Tensor, levels: int) -> torch.Tensor:
    """``span / levels``, never below fp16's smallest normal number: the file stores scales as
    fp16, where a smaller scale (a group of weights all under ~0.01 at int8) would flush to 0
    and zero the whole group. An all-zero group gets scale 1."""
    scale = torch.where(span <= 0, torch.ones_like(span), span / levels)
    return scale.clamp(min=FP16_MIN_NORMAL)


def _group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [out, cols] (range including 0), as in quantize_weight."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    levels = 2**bits - 1
    scale = storable_scale(hi - lo, levels)
    return scale, torch.round(-lo / scale).clamp(0, levels)


def gptq_damping(rows: int, width: int) -> float:
    """GPTQ's damping, as a fraction of the mean Hessian diagonal: ``width / rows``, between the
    paper's 1% (many more calibration rows than input channels) and 100% (fewer rows than
    channels: a Hessian of few rows is rank-deficient, and trusting it fits the calibration
    images instead of the layer). Measured on efficientnet-lite0 with 4 calibration photos and
    5 other photos of the calibration set as validation (``bench/quantize_heldout.py``,
    docs/benchmarks.md): the damping with the lowest validation error per layer falls from
    about 0.03 at 80 rows per channel to 0.3-1 at one row per channel and below."""
    return min(1.0, max(0.01, width / max(rows, 1)))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    rows: int,
    bits: int,
    group_size: int | None,
    damp: float | None = None,
    block: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", ICLR 2023): quantize columns one at a time and spread each
    column's rounding error over the columns not yet quantized, weighted by the inverse
    Hessian ``H = 2 X^T X / n`` of the layer's calibration inputs. ``hessian`` is the sum
    ``X^T X`` over all ``rows`` input rows (streamed by the calibration, every position and
    token); ``damp`` (default :func:`gptq_damping`) x mean diagonal is added; lazy updates in
    blocks of ``block`` columns. ``act_order`` quantizes columns in order of decreasing ``H``
    diagonal (per-channel scales only, so the stored layout stays in the original column order).
    """
    if act_order and group_size is not None:
        raise UsageError("act-order needs per-channel scales (--group-size channel)")
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    if damp is None:
        damp = gptq_damping(rows, in_features)
    h = (2 * hessian.double() / max(rows, 1)).float()
    # Input channels that are zero on every calibration row: the reference GPTQ zeroes their
    # weights, which a calibration set of a few images then turns into a broken layer (a ReLU
    # channel silent on 4 images fires on the 5th). They are rounded to nearest instead: a unit
    # diagonal and no coupling, so no error flows into or out of them.
    dead = torch.diag(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    group = in_features if group_size is None else group_size
    groups = -(-in_features // group)
    scales = torch.ones(out_features, groups)
    zeros = torch.zeros(out_features, groups)
    if group_size is None:
        scales[:, 0], zeros[:, 0] = _group_params(w, bits)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_features)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = 2**bits - 1
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w1 = w[:, start:end].clone()
        errors = torch.zeros_like(w1)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if group_size is not None and column % group == 0:
                g = column // group
                span = torch.cat([w1[:, i:], w[:, end:]], dim=1)[:, :group]
                scales[:, g], zeros[:, g] = _group_params(span, bits)
            g = 0 if group_size is None else column // group
            q = (torch.round(w1[:, i] / scales[:, g]) + zeros[:, g]).clamp(0, levels)
            dequantized = (q - zeros[:, g]) * scales[:, g]
            codes[:, perm[column]] = q.to(torch.uint8)
            error = (w1[:, i] - dequantized) / h1[i, i]
            w1[:, i:] -= error.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    packed = pack_int4(codes) if bits == 4 else codes
    return QuantizedWeight(
        packed, scales.contiguous(), zeros.to(torch.uint8).contiguous(), bits, group, (out_features, in_features)
    )
