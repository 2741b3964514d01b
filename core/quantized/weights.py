"""How quantized weights are held: :class:`QuantizedWeight` and int4 packing."""

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


def effective_weight(weight: QuantizedWeight, column_scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """The weight the layer multiplies by: dequantized, times the AWQ column scale if any."""
    w = weight.dequantize(torch.float32)
    if column_scale is not None:
        w = w * column_scale.float().view(1, -1)
    return w.to(dtype)
