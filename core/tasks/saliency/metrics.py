"""Per-map figures: peak, concentration, compact map, and faithfulness (deletion/insertion)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from visbatch.core.errors import UsageError
from visbatch.core.tasks.saliency.methods import gaussian_blur


def peaks(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of each map's maximum, in [0, 1] units of the map (pixel centres)."""
    b, h, w = maps.shape
    flat = maps.reshape(b, -1).argmax(dim=1)
    return ((flat % w).float() + 0.5) / w, ((flat // w).float() + 0.5) / h


def concentration(maps: torch.Tensor, top_fraction: float = 0.1) -> torch.Tensor:
    """Share of the absolute attribution mass in the top ``top_fraction`` of pixels, per map.

    0.1 for a flat map, 1.0 when everything sits in the top 10%.
    """
    flat = maps.reshape(maps.shape[0], -1).abs().float()
    k = max(1, int(round(flat.shape[1] * top_fraction)))
    total = flat.sum(dim=1)
    top = flat.topk(k, dim=1).values.sum(dim=1)
    return torch.where(total > 0, top / total.clamp(min=1e-30), torch.full_like(total, float("nan")))


def compact_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps averaged down to ``size`` x ``size`` (area pooling keeps the sign and the mass)."""
    return F.adaptive_avg_pool2d(maps.unsqueeze(1).float(), (size, size)).squeeze(1)


def deletion_insertion_curves(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    maps: torch.Tensor,
    steps: int,
    black: torch.Tensor,
    internal_batch_size: int = 64,
    deletion_fill: str = "blur",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves, [B, steps + 1] each (Petsiuk et al., "RISE", BMVC 2018, sec. 4.1).

    Pixels are ranked by the map, highest first. *Deletion* replaces the top
    ``k/steps`` of the pixels, ``k = 0..steps``, with ``deletion_fill``:
    ``black`` (pixel value 0, ``black`` normalized; Petsiuk's original) or
    ``blur`` (a heavy blur of the image, sigma = 1/10 of the shorter side:
    black blobs are themselves out-of-distribution evidence, which lets a
    random map look faithful); *insertion* starts from that blur and puts
    back the original pixels in the same order. The curve is the explained score
    (``score_fn(x, targets) -> [N]``: a probability for classifiers and
    zero-shot labels, the cosine for a prompt or caption) and the AUC is its
    trapezoid mean over the fraction of pixels. Lower deletion and higher
    insertion AUC mean a more faithful map. All ``steps + 1`` images of every
    input are scored in batched forward passes.
    """
    batch, _, h, w = images.shape
    order = maps.reshape(batch, -1).float().argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=maps.device).expand(batch, -1))
    rank = rank.view(batch, 1, h, w)
    blurred = gaussian_blur(images, sigma=min(h, w) / 10)
    if deletion_fill not in ("black", "blur"):
        raise UsageError(f"unknown deletion fill {deletion_fill!r} (black or blur)")
    fill = black.to(images.dtype).expand_as(images) if deletion_fill == "black" else blurred
    thresholds = [round(h * w * k / steps) for k in range(steps + 1)]
    curves = {}
    for name, start, end in (("deletion", images, fill), ("insertion", blurred, images)):
        scores = []
        per_chunk = max(1, internal_batch_size // batch)
        for first in range(0, steps + 1, per_chunk):
            ks = thresholds[first : first + per_chunk]
            # Pixels whose rank is below the threshold have been switched to ``end``.
            switched = torch.stack([(rank < k) for k in ks])  # [n, B, 1, H, W]
            variants = torch.where(switched, end.unsqueeze(0), start.unsqueeze(0)).reshape(-1, *images.shape[1:])
            with torch.no_grad():
                scores.append(score_fn(variants, targets.repeat(len(ks))).float().view(len(ks), batch))
        curves[name] = torch.cat(scores).T  # [B, steps + 1]
    return curves["deletion"], curves["insertion"]


def curve_auc(curve: torch.Tensor) -> torch.Tensor:
    """The trapezoid mean of [B, steps + 1] curves over the fraction of pixels, [B]."""
    return ((curve[:, 1:] + curve[:, :-1]) / 2).mean(dim=1)


def deletion_insertion_auc(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUC [B] of :func:`deletion_insertion_curves` (same arguments)."""
    deletion, insertion = deletion_insertion_curves(*args, **kwargs)
    return curve_auc(deletion), curve_auc(insertion)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps (flattened), per map."""

    def ranks(x):
        flat = x.reshape(x.shape[0], -1).float()
        return flat.argsort(dim=1).argsort(dim=1).float()

    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)
