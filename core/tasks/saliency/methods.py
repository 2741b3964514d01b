"""Attribution methods: one registry, one signature.

Every method is ``method(forward, images, targets, *, its parameters) -> Attribution``
(called through :func:`call_method`, which passes each method the parameters it declares):

- ``forward(x) -> [N, K]`` scores for a batch of model inputs (normalized,
  on the device); the explained score of image ``i`` is
  ``forward(x)[i, targets[i]]``. Each image's score depends on that image
  only, so methods batch freely (steps, samples and masks are stacked into
  large forward passes, chunked to ``internal_batch_size``).
- ``images``: [B, 3, H, W] model inputs; ``targets``: [B] long. Methods
  marked ``picks_targets`` also take ``targets=None``: each image's top
  output is explained, chosen in the method's own forward pass (one forward
  pass saved), and ``extras`` return the ``targets`` and ``scores``.
- The result's ``maps`` are [B, H, W] float32 at input resolution; ``raw``
  keeps per-channel attributions where a method has them (for parity with
  Captum), ``extras`` per-image figures such as IG's completeness gap.

Methods that need a layer or the attention modules receive them as
parameters (``layer``, ``attention``), which :class:`SaliencyTask` fills in.

Over 400 lines on purpose: one short function per method and the METHODS registry that names them;
splitting would scatter the registry.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from visbatch.core.errors import UsageError
from visbatch.core.tasks.saliency.attention import AttentionRecorder

if TYPE_CHECKING:
    from visbatch.core.models.spatial import SpatialLayer

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Attribution:
    maps: torch.Tensor  # [B, H, W] float32, signed where the method is signed
    raw: torch.Tensor | None = None  # [B, 3, H, W] per-channel attributions, if any
    low_res: torch.Tensor | None = None  # [B, h, w] layer-resolution map (CAM methods)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image [B] values


@dataclass(frozen=True)
class LayerAccess:
    """Where a CAM method reads activations: the module, and how to turn them into a map."""

    module: torch.nn.Module
    spatial: SpatialLayer


@dataclass(frozen=True)
class MethodSpec:
    function: Callable
    description: str
    signed: bool  # whether maps carry sign (overlays use a diverging colormap)
    needs: tuple[str, ...] = ()  # "layer", "attention"
    gradient_based: bool = True  # SmoothGrad can wrap it
    picks_targets: bool = False  # accepts targets=None: top output chosen in its own forward pass
    # The method's parameters: keys of METHOD_PARAMETERS, each set from its CLI option.
    parameters: tuple[str, ...] = ()
    # Preparation, as data: ``setup(run) -> params`` once per run (a mask set), and
    # ``per_batch(run, images, records, params) -> params`` for each batch (seeded noise);
    # ``run`` is the SaliencyTask (seed, model, pixel range).
    setup: Callable | None = None
    per_batch: Callable | None = None


@dataclass(frozen=True)
class MethodParameter:
    """A method parameter and the CLI option that sets it (``cli/saliency.py`` declares each option once)."""

    option: str
    default: Any
    help: str


METHOD_PARAMETERS: dict[str, MethodParameter] = {
    "signed": MethodParameter("--signed", False, "gradient: keep the sign (channel sum) instead of |grad|"),
    "samples": MethodParameter("--samples", 16, "smoothgrad: noisy samples per image"),
    "sigma": MethodParameter("--sigma", 0.15, "SmoothGrad noise, fraction of the input range"),
    "steps": MethodParameter("--steps", 32, "integrated-gradients: integration steps"),
    "rule": MethodParameter("--ig-rule", "gausslegendre", "integrated-gradients: quadrature rule"),
    "baseline": MethodParameter("--baseline", "black", "integrated-gradients: black, blur, noise or zero"),
    "masks": MethodParameter("--masks", 1000, "rise: number of random masks"),
    "cells": MethodParameter("--cells", 7, "rise: mask grid cells per side"),
    "probability": MethodParameter("--keep-probability", 0.5, "rise: keep probability p"),
}


def item_seed(seed: int, relpath: str) -> int:
    """A per-image seed: an image's noise or masks do not depend on the batch it is in."""
    digest = hashlib.blake2b(f"{seed}:{relpath}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def _rise_setup(run) -> dict:
    # One mask set for the whole run: maps do not depend on the batching.
    generator = torch.Generator(device="cpu").manual_seed(run.config.seed)
    p = run.method_params
    masks = rise_masks(
        p.get("masks", 1000),
        p.get("cells", 7),
        p.get("probability", 0.5),
        run.model.preprocess.geometry.crop,
        "cpu",
        generator,
    )
    return {"mask_set": masks.to(run.model.device)}


def _noise_baselines(run, images, records, params) -> dict:
    if params.get("baseline") != "noise":
        return {}
    low, high = run.pixel_range
    noise = [
        torch.rand(
            (1, *images.shape[1:]), generator=torch.Generator().manual_seed(item_seed(run.config.seed, r.item.relpath))
        )
        for r in records
    ]
    return {"baselines": torch.cat(noise).to(images.device, images.dtype) * (high - low) + low}


def _seeded_generator(run, images, records, params) -> dict:
    return {"generator": torch.Generator(device=images.device).manual_seed(run.config.seed)}


def call_method(spec: MethodSpec, forward: Forward, images: torch.Tensor, targets, params: dict) -> Attribution:
    """Call a method with the parameters its function declares. The engine offers every run-wide
    value (``black``, ``pixel_range``, ``internal_batch_size``, ``layer``, ...); a method takes the
    ones it names, and a parameter no method names is a registry error caught by the tests, not a
    keyword silently swallowed."""
    accepted = inspect.signature(spec.function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return spec.function(forward, images, targets, **params)
    return spec.function(forward, images, targets, **{k: v for k, v in params.items() if k in accepted})


def target_scores(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.gather(1, targets.view(-1, 1)).squeeze(1)


def _pick(outputs: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the targets; ``targets=None`` picks each image's top output in this same pass."""
    if targets is None:
        targets = outputs.detach().argmax(dim=1)
    return target_scores(outputs, targets), targets


def _chosen(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    return {"targets": targets, "scores": scores.detach().float()}


def _input_gradients(
    forward: Forward, x: torch.Tensor, targets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of each image's target score w.r.t. its input, the scores and the targets."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores, targets = _pick(forward(x), targets)
        (grads,) = torch.autograd.grad(scores.sum(), x)
    return grads, scores.detach(), targets


def _chunks(total: int, size: int):
    for start in range(0, total, max(1, size)):
        yield start, min(total, start + max(1, size))


# ----------------------------------------------------------------------------
# Gradient methods
# ----------------------------------------------------------------------------


def gradient(forward: Forward, images: torch.Tensor, targets: torch.Tensor, *, signed: bool = False) -> Attribution:
    """Vanilla gradient (Simonyan et al., "Deep Inside Convolutional Networks", 2014).

    ``raw = |d f_t / d x|`` (signed gradient with ``signed=True``); the map is
    the maximum over colour channels of ``|grad|`` as in the paper, or the
    channel sum of the signed gradient.
    """
    grads, scores, targets = _input_gradients(forward, images, targets)
    raw = grads if signed else grads.abs()
    maps = raw.sum(dim=1) if signed else raw.amax(dim=1)
    return Attribution(maps.float(), raw, extras=_chosen(scores, targets))


def input_x_gradient(forward: Forward, images: torch.Tensor, targets: torch.Tensor) -> Attribution:
    """Input times gradient (Shrikumar et al. 2016): ``raw = x * d f_t / d x``, map = channel sum (signed)."""
    grads, scores, targets = _input_gradients(forward, images, targets)
    raw = images * grads
    return Attribution(raw.sum(dim=1).float(), raw, extras=_chosen(scores, targets))


def input_range(images: torch.Tensor, pixel_range: tuple[float, float] | None = None) -> float:
    """Width of the input space, for noise given as a fraction of it."""
    if pixel_range is not None:
        return float(pixel_range[1] - pixel_range[0])
    return float(images.max() - images.min())


def smoothgrad(
    forward: Forward,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    samples: int = 16,
    sigma: float = 0.15,
    base: str = "gradient",
    pixel_range: tuple[float, float] | None = None,
    internal_batch_size: int = 64,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    **params,
) -> Attribution:
    """SmoothGrad (Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017).

    ``raw = mean_n A(x + eps_n)``, ``eps_n ~ N(0, (sigma * (x_max - x_min))^2)``
    where ``A`` is the ``base`` gradient method and ``x_max - x_min`` the width
    of the model's input space (``pixel_range``). The noisy copies of all
    images are batched together; noise is drawn as ``torch.normal`` over
    ``images.repeat_interleave(samples)``, the same layout as Captum's
    ``NoiseTunnel``, so a seeded run reproduces it. ``noise`` ([B * samples,
    ...], in that layout) may be given instead, e.g. drawn per image so that
    results do not depend on how images were batched.
    """
    method = METHODS[base]
    if not method.gradient_based or base == "smoothgrad":
        raise UsageError(f"SmoothGrad cannot wrap {base!r}")
    if noise is None:
        stdev = sigma * input_range(images, pixel_range)
        expanded_shape = (images.shape[0] * samples, *images.shape[1:])
        noise = torch.normal(
            0.0, torch.full(expanded_shape, stdev, device=images.device, dtype=torch.float32), generator=generator
        )
    noise = noise.to(images.device, images.dtype)
    noisy = images.repeat_interleave(samples, dim=0) + noise
    expanded_targets = targets.repeat_interleave(samples)
    raws: list[torch.Tensor] = []
    maps: list[torch.Tensor] = []
    for start, end in _chunks(noisy.shape[0], internal_batch_size):
        result = call_method(method, forward, noisy[start:end], expanded_targets[start:end], params)
        if result.raw is not None:
            raws.append(result.raw)
        maps.append(result.maps)
    # A base method gives per-channel attributions for every chunk or for none.
    raw = torch.cat(raws).view(images.shape[0], samples, *images.shape[1:]).mean(dim=1) if raws else None
    mean_maps = torch.cat(maps).view(images.shape[0], samples, *maps[0].shape[1:]).mean(dim=1)
    return Attribution(mean_maps, raw)


# ----------------------------------------------------------------------------
# Integrated Gradients
# ----------------------------------------------------------------------------


def integration_points(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1] for the path integral.

    ``gausslegendre``: Gauss-Legendre nodes and weights mapped to [0, 1];
    ``riemann`` (= trapezoid), ``riemann-left``, ``riemann-right``,
    ``riemann-middle``: Riemann sums. Same points as Captum's methods of the
    same names.
    """
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    if rule in ("riemann", "riemann-trapezoid"):
        if steps < 2:
            raise UsageError("the trapezoid rule needs at least 2 steps")
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return np.linspace(0, 1, steps), weights
    if rule == "riemann-left":
        return np.arange(steps) / steps, np.full(steps, 1.0 / steps)
    if rule == "riemann-right":
        return np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
    if rule == "riemann-middle":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    raise UsageError(f"unknown integration rule {rule!r} (gausslegendre, riemann, riemann-left/right/middle)")


def make_baseline(
    images: torch.Tensor,
    kind: str,
    black: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    pixel_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """IG and deletion baselines in model-input space.

    ``black``: pixel value 0 everywhere (``black`` is its normalized value per
    channel, [1, 3, 1, 1]); ``blur``: a Gaussian blur of the image with sigma
    = 1/10 of its shorter side (content gone, colours kept); ``noise``:
    uniform noise over the input range; ``zero``: 0 in normalized space (the
    dataset mean colour).
    """
    if kind == "black":
        if black is None:
            raise UsageError("black baseline needs the model's normalization")
        return black.to(images.dtype).expand_as(images).clone()
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "blur":
        return gaussian_blur(images, sigma=min(images.shape[-2:]) / 10)
    if kind == "noise":
        lo, hi = pixel_range if pixel_range is not None else (float(images.min()), float(images.max()))
        return torch.rand(images.shape, generator=generator, device=images.device).to(images.dtype) * (hi - lo) + lo
    raise UsageError(f"unknown baseline {kind!r} (black, blur, noise, zero)")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, batched on the device."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, min(images.shape[-2:]) - 1)
    xs = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def integrated_gradients(
    forward: Forward,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 32,
    rule: str = "gausslegendre",
    baseline: str = "black",
    black: torch.Tensor | None = None,
    baselines: torch.Tensor | None = None,
    internal_batch_size: int = 64,
    pixel_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> Attribution:
    """Integrated Gradients (Sundararajan et al., "Axiomatic Attribution for Deep Networks", ICML 2017).

    ``raw = (x - b) * sum_k w_k * d f_t / d x (b + a_k (x - b))`` with the
    points ``(a_k, w_k)`` of :func:`integration_points`. All images' path
    points are stacked and run in chunks of ``internal_batch_size`` inputs.
    ``extras["completeness_gap"] = sum(raw) - (f_t(x) - f_t(b))`` per image;
    it shrinks as ``steps`` grows.
    """
    if baselines is None:
        baselines = make_baseline(images, baseline, black, generator, pixel_range)
    alphas, weights = integration_points(steps, rule)
    batch = images.shape[0]
    delta = images - baselines
    total = torch.zeros_like(images, dtype=torch.float32)
    alphas_t = torch.tensor(alphas, device=images.device, dtype=torch.float32)
    weights_t = torch.tensor(weights, device=images.device, dtype=torch.float32)
    # Path points in step-major order: point j is step j // batch of image j % batch.
    steps_per_chunk = max(1, internal_batch_size // batch)
    for first, last in _chunks(steps, steps_per_chunk):
        a = alphas_t[first:last].view(-1, 1, 1, 1, 1).to(images.dtype)
        points = (baselines.unsqueeze(0) + a * delta.unsqueeze(0)).reshape(-1, *images.shape[1:])
        grads = _input_gradients(forward, points, targets.repeat(last - first))[0]
        grads = grads.view(last - first, batch, *images.shape[1:]).float()
        total += (grads * weights_t[first:last].view(-1, 1, 1, 1, 1)).sum(dim=0)
    raw = delta.float() * total
    with torch.no_grad():
        ends = target_scores(forward(torch.cat([images, baselines])), targets.repeat(2)).float()
    gap = raw.flatten(1).sum(dim=1) - (ends[:batch] - ends[batch:])
    return Attribution(raw.sum(dim=1), raw, extras={"completeness_gap": gap})


# ----------------------------------------------------------------------------
# CAM methods
# ----------------------------------------------------------------------------


def _layer_activations_and_grads(
    forward: Forward, images: torch.Tensor, targets: torch.Tensor | None, layer: LayerAccess
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Activations of ``layer`` as [B, C, h, w] maps, the target scores' gradients w.r.t. them,
    and the chosen targets and scores."""
    captured: dict[str, torch.Tensor] = {}
    spatial = layer.spatial
    if spatial.kind == "conv":
        handle = layer.module.register_forward_hook(lambda m, a, out: captured.setdefault("act", out))
    else:
        handle = layer.module.register_forward_pre_hook(lambda m, a: captured.setdefault("act", a[0]))
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            scores, targets = _pick(forward(x), targets)
            activation = captured["act"]
            (grads,) = torch.autograd.grad(scores.sum(), activation)
    finally:
        handle.remove()
    image_hw = (images.shape[-2], images.shape[-1])
    activation = spatial.to_map(activation.detach(), image_hw).float()
    grads = spatial.to_map(grads, image_hw).float()
    return activation, grads, _chosen(scores, targets)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def gradcam(forward: Forward, images: torch.Tensor, targets: torch.Tensor, *, layer: LayerAccess) -> Attribution:
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    ``w_c = mean_{h,w} d f_t / d A_c``; ``CAM = relu(sum_c w_c A_c)`` at the
    layer's resolution (``low_res``), upsampled bilinearly to the input. For
    ViTs ``A`` is the token grid before the last block, class and register
    tokens dropped.
    """
    activation, grads, chosen = _layer_activations_and_grads(forward, images, targets, layer)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1))
    return Attribution(_upsample(cam, (images.shape[-2], images.shape[-1])), low_res=cam, extras=chosen)


def gradcam_plus_plus(
    forward: Forward, images: torch.Tensor, targets: torch.Tensor, *, layer: LayerAccess
) -> Attribution:
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), with the exponential-score closed form.

    ``alpha = g^2 / (2 g^2 + sum_{h,w} A * g^3)`` (0 where ``g = 0`` or the denominator is 0),
    ``w_c = sum_{h,w} alpha * relu(g)``, ``CAM = relu(sum_c w_c A_c)``.
    """
    activation, grads, chosen = _layer_activations_and_grads(forward, images, targets, layer)
    g2 = grads.pow(2)
    g3 = g2 * grads
    sum_activation = activation.sum(dim=(2, 3), keepdim=True)
    # No additive epsilon: with logit gradients of ~1e-3, g^2 ~ 1e-6 and an epsilon of that size
    # (pytorch-grad-cam adds 1e-6) shifts the weights by several percent. 0/0 becomes 0 instead.
    denominator = 2 * g2 + sum_activation * g3
    safe = (grads != 0) & (denominator != 0)
    alpha = torch.where(safe, g2 / torch.where(safe, denominator, torch.ones_like(denominator)), torch.zeros_like(g2))
    weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1))
    return Attribution(_upsample(cam, (images.shape[-2], images.shape[-1])), low_res=cam, extras=chosen)


# ----------------------------------------------------------------------------
# Perturbation
# ----------------------------------------------------------------------------


def rise_masks(
    count: int, cells: int, probability: float, size: tuple[int, int], device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RISE masks: binary ``cells x cells`` grids (keep probability ``p``), upsampled bilinearly
    to ``(cells + 1) * cell_size`` and cropped at a random shift: [count, H, W] in [0, 1]."""
    h, w = size
    cell_h, cell_w = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(count, 1, cells, cells, generator=generator, device=device) < probability).float()
    up = F.interpolate(grid, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False)
    shift_y = torch.randint(0, cell_h, (count,), generator=generator, device=device)
    shift_x = torch.randint(0, cell_w, (count,), generator=generator, device=device)
    rows = shift_y.view(-1, 1) + torch.arange(h, device=device).view(1, -1)  # [count, h]
    cols = shift_x.view(-1, 1) + torch.arange(w, device=device).view(1, -1)  # [count, w]
    up = up.squeeze(1)
    return up[torch.arange(count, device=device).view(-1, 1, 1), rows.unsqueeze(2), cols.unsqueeze(1)]


def rise(
    forward: Forward,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    masks: int = 1000,
    cells: int = 7,
    probability: float = 0.5,
    black: torch.Tensor | None = None,
    internal_batch_size: int = 64,
    generator: torch.Generator | None = None,
    mask_set: torch.Tensor | None = None,
) -> Attribution:
    """RISE (Petsiuk et al., "RISE: Randomized Input Sampling for Explanation", BMVC 2018).

    ``S = 1 / (N p) * sum_i f_t(b + M_i (x - b)) M_i`` over ``N`` random
    masks shared by the batch; masked-out pixels take the black baseline
    ``b``. Forward passes only, batched in chunks of ``internal_batch_size``.
    ``mask_set`` ([N, H, W]) replaces the random draw (one set for a whole run).
    """
    batch = images.shape[0]
    size = (images.shape[-2], images.shape[-1])
    if mask_set is None:
        mask_set = rise_masks(masks, cells, probability, size, images.device, generator)
    masks = mask_set.shape[0]
    fill = (
        black.to(images.dtype)
        if black is not None
        else torch.zeros(1, 3, 1, 1, device=images.device, dtype=images.dtype)
    )
    saliency = torch.zeros(batch, *size, device=images.device, dtype=torch.float32)
    masks_per_chunk = max(1, internal_batch_size // batch)
    with torch.no_grad():
        for first, last in _chunks(masks, masks_per_chunk):
            m = mask_set[first:last].to(images.dtype)  # [n, H, W]
            masked = fill.unsqueeze(0) + m.view(-1, 1, 1, *size) * (images - fill).unsqueeze(0)  # [n, B, 3, H, W]
            scores = target_scores(forward(masked.reshape(-1, *images.shape[1:])), targets.repeat(last - first))
            saliency += torch.einsum("nb,nhw->bhw", scores.view(last - first, batch).float(), m.float())
    return Attribution(saliency / (masks * probability))


# ----------------------------------------------------------------------------
# Attention relevance
# ----------------------------------------------------------------------------


def attention_relevance(
    forward: Forward, images: torch.Tensor, targets: torch.Tensor, *, attention: list, spatial
) -> Attribution:
    """Gradient-weighted attention rollout (Chefer, Gur and Wolf, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021).

    ``R = I``; for each block ``A_bar = mean_heads(relu(dA ⊙ A))``,
    ``R <- R + A_bar R``. The relevance of the patches is the class token's
    row of ``R`` (the mean over all rows for models without one), class and
    register tokens dropped, laid out on the patch grid and upsampled.
    """
    recorder = AttentionRecorder(attention)
    with torch.enable_grad(), recorder:
        x = images.detach().requires_grad_(True)
        scores, targets = _pick(forward(x), targets)
        grads = torch.autograd.grad(scores.sum(), recorder.probabilities)
    probabilities = [p.detach().float() for p in recorder.probabilities]
    tokens = probabilities[0].shape[-1]
    relevance = torch.eye(tokens, device=images.device).expand(images.shape[0], tokens, tokens).clone()
    for probs, grad in zip(probabilities, grads):
        weighted = F.relu(grad.float() * probs).mean(dim=1)  # [B, T, T]
        relevance = relevance + torch.bmm(weighted, relevance)
    prefix = spatial.prefix_tokens
    rows, cols = spatial.grid_for(tuple(images.shape[-2:]))
    patch_relevance = relevance[:, 0, prefix:] if prefix > 0 else relevance.mean(dim=1)
    grid = patch_relevance.reshape(images.shape[0], rows, cols)
    return Attribution(
        _upsample(grid, (images.shape[-2], images.shape[-1])), low_res=grid, extras=_chosen(scores, targets)
    )


def random_map(
    forward: Forward,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    cells: int = 7,
    generator: torch.Generator | None = None,
) -> Attribution:
    """Smooth random maps: uniform noise on a ``cells x cells`` grid, upsampled bilinearly.

    The baseline a method must beat in deletion/insertion scores. Smooth, as
    CAM maps are: per-pixel noise would delete pixels in a salt-and-pepper
    pattern that wrecks any CNN's input after a few percent, an unfair
    baseline for maps that remove whole regions.
    """
    grid = torch.rand(images.shape[0], cells, cells, generator=generator, device=images.device)
    return Attribution(_upsample(grid, (images.shape[-2], images.shape[-1])), low_res=grid)


METHODS: dict[str, MethodSpec] = {
    "gradient": MethodSpec(
        gradient,
        "vanilla gradient |df/dx| (Simonyan et al. 2014); --signed for the sign",
        signed=False,
        picks_targets=True,
        parameters=("signed",),
    ),
    "input-x-gradient": MethodSpec(
        input_x_gradient, "input times gradient (Shrikumar et al. 2016)", signed=True, picks_targets=True
    ),
    "smoothgrad": MethodSpec(
        smoothgrad,
        "SmoothGrad: mean gradient over noisy copies (Smilkov et al. 2017)",
        signed=False,
        gradient_based=False,
        parameters=("samples", "sigma", "signed"),
    ),
    "integrated-gradients": MethodSpec(
        integrated_gradients,
        "Integrated Gradients with completeness gap (Sundararajan et al. 2017)",
        signed=True,
        parameters=("steps", "rule", "baseline"),
        per_batch=_noise_baselines,
    ),
    "gradcam": MethodSpec(
        gradcam,
        "Grad-CAM on the last conv stage or ViT token grid (Selvaraju et al. 2017)",
        signed=False,
        needs=("layer",),
        gradient_based=False,
        picks_targets=True,
    ),
    "gradcam++": MethodSpec(
        gradcam_plus_plus,
        "Grad-CAM++ (Chattopadhay et al. 2018)",
        signed=False,
        needs=("layer",),
        gradient_based=False,
        picks_targets=True,
    ),
    "rise": MethodSpec(
        rise,
        "RISE: random masks, forward passes only (Petsiuk et al. 2018)",
        signed=False,
        gradient_based=False,
        parameters=("masks", "cells", "probability"),
        setup=_rise_setup,
    ),
    "attention-relevance": MethodSpec(
        attention_relevance,
        "gradient-weighted attention rollout for ViTs (Chefer et al. 2021)",
        signed=False,
        needs=("attention",),
        gradient_based=False,
        picks_targets=True,
    ),
    "random": MethodSpec(
        random_map,
        "smooth random map, 7x7 cells upsampled (the baseline for --eval)",
        signed=False,
        gradient_based=False,
        per_batch=_seeded_generator,
    ),
}
