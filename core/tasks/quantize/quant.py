"""Group-wise asymmetric integer quantization of weight matrices: the pure maths.

A weight ``W`` [out, in] is split along ``in`` into groups of ``group_size``
columns (``in`` for per-channel). Each (row, group) gets a scale and an
integer zero point: ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``,
``w ~ (q - zero) * scale``, with ``scale = (max - min) / (2^bits - 1)`` and
``zero = round(-min / scale)``, where the range [min, max] always includes 0
(so the zero point is in range and 0 is exact; a constant group is exact).
All maths run in fp32; an all-zero group gets scale 1 and dequantizes to 0.
int4 values are packed two per byte (low nibble first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # uint8: [out, in] for 8 bits, [out, ceil(in / 2)] packed for 4 bits
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor  # uint8 [out, groups]
    bits: int
    group_size: int  # columns per group (== in_features for per-channel)
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.shape
        q = unpack_int4(self.qweight, in_features) if self.bits == 4 else self.qweight
        groups = self.scales.shape[1]
        padded = groups * self.group_size
        q = q.float()
        if padded != in_features:
            q = torch.nn.functional.pad(q, (0, padded - in_features))
        q = q.view(out_features, groups, self.group_size)
        w = (q - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        return w.view(out_features, padded)[:, :in_features].to(dtype)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2 + self.zeros.numel()  # scales stored as fp16


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None) -> QuantizedWeight:
    """Asymmetric group-wise quantization (see module docstring). ``group_size=None``: per channel."""
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    w = weight.detach().float()
    out_features, in_features = w.shape
    group = in_features if group_size is None else int(group_size)
    if group < 1:
        raise ValueError("group size must be positive")
    groups = -(-in_features // group)
    padded = groups * group
    if padded != in_features:
        # Pad with each row's first value so that padding never widens a group's range.
        w = torch.cat([w, w[:, :1].expand(out_features, padded - in_features)], dim=1)
    grouped = w.view(out_features, groups, group)
    # The range always includes 0: zero points stay in range and 0 is exact.
    lo = grouped.amin(dim=-1).clamp(max=0)
    hi = grouped.amax(dim=-1).clamp(min=0)
    levels = 2 ** bits - 1
    span = hi - lo
    empty = span <= 0  # an all-zero group
    scale = torch.where(empty, torch.ones_like(span), span / levels)
    zero = torch.round(-lo / scale).clamp(0, levels)
    q = torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    q = q.clamp(0, levels).to(torch.uint8).view(out_features, padded)[:, :in_features]
    packed = pack_int4(q) if bits == 4 else q.contiguous()
    return QuantizedWeight(packed, scale.contiguous(), zero.to(torch.uint8).contiguous(), bits, group,
                           (out_features, in_features))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values in 0..15 -> [out, ceil(in / 2)] bytes, low nibble = even column."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1)[:, :columns]
