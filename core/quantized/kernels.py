"""The packed int4 matmul of PyTorch on CUDA (``torch._weight_int4pack_mm``, tinygemm), for
``--runtime memory``: the weight stays packed on the device and is never dequantized.

Layout: tinygemm takes the weight as ``_convert_weight_to_int4pack`` of a
[out, in / 2] uint8 tensor with the even column in the *high* nibble (visbatch
packs it in the low nibble), and one bf16 [groups, out, 2] tensor of scale and
zero with ``w = (q - 8) * scale + zero``; visbatch's ``w = (q - z) * scale``
gives ``zero = (8 - z) * scale``. AWQ's explicit column scale multiplies the
input instead of the weight.

Why only ``memory``: in ``speed`` mode the dequantized weight is cached and a
dense bf16 matmul is at least as fast at the pipeline's batch sizes (tinygemm
is built for few rows); on CPU the packed kernels measured slower than a
dense matmul (docs/benchmarks.md), so CPU always dequantizes.

Each layer checks the kernel against dequantize-then-matmul on its first call
and falls back to that path on any error or mismatch, so a PyTorch whose
kernel or layout differs gives the plain path, never wrong outputs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("visbatch")

INNER_K_TILES = 8
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
CHECK_TOLERANCE = 2e-2  # relative error of the kernel against the dequantized matmul (bf16 rounding)


def int4_kernel_applies(bits: int, group_size: int, shape: tuple[int, int], device: torch.device) -> bool:
    out_features, in_features = shape
    return (
        bits == 4
        and device.type == "cuda"
        and hasattr(torch, "_weight_int4pack_mm")
        and group_size in KERNEL_GROUP_SIZES
        and in_features % max(group_size, INNER_K_TILES * 16) == 0
        and out_features % 8 == 0
    )


def tinygemm_scale_and_zero(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[groups, out, 2] (scale, zero) with ``w = (q - 8) * scale + zero`` from visbatch's
    [out, groups] scales and integer zero points (``w = (q - z) * scale``)."""
    scale = scales.float()
    zero = (8 - zeros.float()) * scale
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """visbatch packs the even column in the low nibble; tinygemm wants it in the high one."""
    return ((packed & 0x0F) << 4) | (packed >> 4)


class Int4Kernel:
    """``x @ W.T`` through ``torch._weight_int4pack_mm`` for one packed weight on a CUDA device."""

    def __init__(self, qweight, scales, zeros, group_size, shape, column_scale, device):
        self.group_size, self.shape = group_size, shape
        self.packed = torch._convert_weight_to_int4pack(swap_nibbles(qweight).to(device), INNER_K_TILES)
        self.scale_and_zero = tinygemm_scale_and_zero(scales, zeros).to(device, torch.bfloat16)
        self.column_scale = None if column_scale is None else column_scale.to(device, torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.shape[1])
        if self.column_scale is not None:
            rows = rows * self.column_scale
        out = torch._weight_int4pack_mm(rows.contiguous(), self.packed, self.group_size, self.scale_and_zero)
        return out.reshape(*x.shape[:-1], self.shape[0])


def verified_kernel(build, reference_weight, in_features: int, device, name: str = "layer"):
    """``build()`` if its output matches ``x @ reference_weight.T`` on a random probe, else None
    (logged once)."""
    try:
        kernel = build()
        probe = torch.randn(16, in_features, device=device, dtype=torch.bfloat16)
        expected = F.linear(probe.float(), reference_weight.float())
        got = kernel(probe).float()
        error = float((got - expected).norm() / expected.norm().clamp(min=1e-12))
        if error <= CHECK_TOLERANCE:
            return kernel
        log.warning(
            "int4 kernel disagrees with the dequantized weight for %s (relative error %.3g); "
            "using dequantize-then-matmul",
            name,
            error,
        )
    except Exception as exc:  # the kernel is optional: any failure means the plain path
        log.warning(
            "int4 kernel unavailable for %s (%s); using dequantize-then-matmul",
            name,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
    return None
