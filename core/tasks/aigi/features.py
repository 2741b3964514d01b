"""Artefact features of generated images, batched on the device.

Inputs are pixel-space tensors: ``x`` float [B, 3, H, W] in [0, 1] (H and W
even) or its uint8 original, at the image's own resolution (centre crop
without resize: a resize destroys the traces these features look for).

- :func:`npr_features`: NPR (Tan et al., "Rethinking the Up-Sampling
  Operations in CNN-based Generative Network for Generalizable Deepfake
  Detection", CVPR 2024): the residual of the image against its own
  nearest-neighbour 2x down- and up-sampling. Up-sampling layers copy or
  interpolate neighbouring pixels, so a generated image's residual is small
  for one of the four 2x2 phases; a camera image's is not.
- :func:`bitplane_features`: statistics of the two lowest bit planes
  (LOTA-style lower-bit noise): sensor noise makes them close to
  independent coin flips; synthesis and smoothing leave structure.
- :func:`spectrum_features`: energy of the high-pass residual's Fourier
  spectrum at the frequencies where periodic up-sampling leaves peaks
  (1/2 and 1/4 cycles per pixel) relative to the spectrum around them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NPR_NAMES = ["npr_mean_abs", "npr_std", "npr_min_phase_ratio", "npr_phase_spread"]
BITPLANE_NAMES = ["bit0_mean", "bit0_agree_h", "bit0_agree_v", "bit1_agree_h", "bit1_agree_v"]
SPECTRUM_NAMES = ["spec_half_h", "spec_half_v", "spec_quarter_h", "spec_quarter_v", "spec_highfreq_fraction"]


def _even(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return x[..., :h, :w]


def npr_residual(x: torch.Tensor, dy: int = 0, dx: int = 0) -> torch.Tensor:
    """``x - up(down(x))`` with nearest-neighbour 2x, sampling the 2x2 phase (dy, dx)."""
    x = _even(x)
    down = x[..., dy::2, dx::2]
    up = down.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return x - up


def npr_features(x: torch.Tensor) -> torch.Tensor:
    """[B, 4]: mean |r| and std of the residual at phase (0, 0), the smallest phase's mean |r|
    relative to the image's neighbour differences, and the spread of the four phases."""
    x = _even(x.float())
    gradient = (
        (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        + (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    ) / 2 + 1e-6
    phases = torch.stack(
        [npr_residual(x, dy, dx).abs().mean(dim=(1, 2, 3)) for dy in (0, 1) for dx in (0, 1)], dim=1
    ) / gradient.unsqueeze(1)
    base = npr_residual(x)
    return torch.stack(
        [
            base.abs().mean(dim=(1, 2, 3)),
            base.std(dim=(1, 2, 3)),
            phases.min(dim=1).values,
            phases.max(dim=1).values - phases.min(dim=1).values,
        ],
        dim=1,
    )


def bitplane_features(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 5] from uint8 pixels: mean of bit 0, and how often bits 0 and 1 agree with their
    right and lower neighbours (0.5 for independent noise)."""
    p = pixels.to(torch.int16)
    out = []
    bit0 = (p & 1).float()
    out.append(bit0.mean(dim=(1, 2, 3)))
    for bit in (0, 1):
        plane = ((p >> bit) & 1).float()
        out.append((plane[..., :, 1:] == plane[..., :, :-1]).float().mean(dim=(1, 2, 3)))
        out.append((plane[..., 1:, :] == plane[..., :-1, :]).float().mean(dim=(1, 2, 3)))
    return torch.stack(out, dim=1)


def spectrum_features(x: torch.Tensor) -> torch.Tensor:
    """[B, 5]: log energy ratio of the high-pass spectrum at 1/2 and 1/4 cycles per pixel
    (horizontal and vertical lines) against the median of the spectrum, and the fraction of
    energy above 1/4 cycles per pixel."""
    gray = _even(x.float()).mean(dim=1, keepdim=True)
    blur = F.avg_pool2d(F.pad(gray, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    residual = (gray - blur).squeeze(1)
    h, w = residual.shape[-2:]
    window = torch.hann_window(h, device=x.device).view(-1, 1) * torch.hann_window(w, device=x.device).view(1, -1)
    power = torch.fft.fft2(residual * window).abs().pow(2)  # [B, H, W], frequencies k / H cycles per pixel
    # A floor on both sides of each ratio: a flat image (no residual at all) gives log(1) = 0,
    # not log(0); for any textured image the floor is many orders below the spectrum.
    floor = 1e-12
    median = power.flatten(1).median(dim=1).values + floor

    def line(index_v=None, index_h=None):
        if index_v is not None:
            return power[:, index_v, :].mean(dim=1) + floor
        return power[:, :, index_h].mean(dim=1) + floor

    feats = [
        torch.log(line(index_h=w // 2) / median),
        torch.log(line(index_v=h // 2) / median),
        torch.log(line(index_h=w // 4) / median),
        torch.log(line(index_v=h // 4) / median),
    ]
    fy = torch.fft.fftfreq(h, device=x.device).abs().view(-1, 1)
    fx = torch.fft.fftfreq(w, device=x.device).abs().view(1, -1)
    high = ((fy > 0.25) | (fx > 0.25)).float()
    feats.append((power * high).sum(dim=(1, 2)) / power.sum(dim=(1, 2)).clamp(min=1e-12))
    return torch.stack(feats, dim=1)
