"""Weight-only int8/int4 quantization (RTN, AWQ, GPTQ) of the models visbatch runs, and its file format.

- :func:`quantization_targets`: which layers are quantized (every linear map
  in transformer blocks, attention's packed ``in_proj_weight`` included, and
  1x1 convolutions), and which are kept and why.
- :mod:`~visbatch.core.tasks.quantize.blockwise`: calibration and
  quantization block by block along the model's chain of blocks, AWQ
  measured on each block's output with its scales folded into LayerNorms.
- :func:`calibrate` + :func:`quantize_layer`: the one-pass path for layers
  outside any chain (statistics of every layer from one pass; AWQ measured
  on the layer's own output, its ``1/s`` kept as an explicit column scale).
- :mod:`~visbatch.core.tasks.quantize.awq`: AWQ's scale and clip searches;
  :mod:`~visbatch.core.tasks.quantize.quant`: rounding, packing and GPTQ.
- What this task writes is read by the engine: the runtime layers and the
  file format live in :mod:`visbatch.core.quantized` (re-exported here for
  the task's own use).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from visbatch.core.errors import UsageError
from visbatch.core.models import LoadedModel
from visbatch.core.quantized import (  # noqa: F401  (the task's view of the engine's reader)
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUT,
    QuantConv1x1,
    QuantizedWeight,
    QuantizedWeightStore,
    QuantLinear,
    check_quantized_tensors,
    describe_file,
    effective_weight,
    install,
    load_quantized,
    read_quantized_config,
    save_quantized,
)
from visbatch.core.tasks.quantize.awq import awq_quantize, search_scale
from visbatch.core.tasks.quantize.quant import gptq_quantize, quantize_weight

MAX_CALIBRATION_ROWS = 2048


@dataclass
class Target:
    name: str  # module path in the model
    kind: str  # linear | conv1x1 | mha_in_proj
    module: nn.Module
    # nn.MultiheadAttention whose out_proj this is: it reads out_proj.weight inside its own
    # forward, so out_proj's hooks never fire (see register_input_hook).
    attention: nn.MultiheadAttention | None = None

    def weight(self) -> torch.Tensor:
        if self.kind == "mha_in_proj":
            return self.module.in_proj_weight.detach()
        return self.module.weight.detach().reshape(cast(int, self.module.weight.shape[0]), -1)


def quantization_targets(
    model: LoadedModel, towers: str = "visual", skip: list[str] | None = None
) -> tuple[list[Target], list[tuple[str, str]]]:
    """(targets, [(name, why kept)]) for ``towers`` = visual | text | all."""
    skip = skip or []
    module = model.module
    targets, kept = [], []
    prefixes = model.adapter.quantization_prefixes(model.spec, towers)
    classifier = module.get_classifier() if hasattr(module, "get_classifier") else None
    for name, child in module.named_modules():
        if not name or not any(name.startswith(p) for p in prefixes):
            continue
        kind = None
        if isinstance(child, nn.MultiheadAttention) and child.in_proj_weight is not None:
            kind = "mha_in_proj"
        elif isinstance(child, nn.Linear):
            kind = "linear"
        elif isinstance(child, nn.Conv2d):
            if child.kernel_size == (1, 1) and child.groups == 1:
                kind = "conv1x1"
            else:
                kept.append(
                    (
                        name,
                        f"conv {child.kernel_size[0]}x{child.kernel_size[1]}"
                        + (" depthwise" if child.groups > 1 else "")
                        + " (only 1x1 convolutions are quantized)",
                    )
                )
                continue
        else:
            continue
        if child is classifier:
            kept.append((name, "classifier head (kept in full precision)"))
        elif any(fnmatch.fnmatch(name, pattern) for pattern in skip):
            kept.append((name, "--skip"))
        else:
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else None
            attention = parent if isinstance(parent, nn.MultiheadAttention) and leaf == "out_proj" else None
            targets.append(Target(name, kind, child, attention))
    embeddings = model.adapter.kept_embeddings
    for tower in ("visual", "text") if towers == "all" else (towers,):
        kept += [
            (name, "embedding/projection (kept in full precision)")
            for name in embeddings.get(tower, [])
            if name not in {k for k, _ in kept}
        ]
    return targets, kept


# ----------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------


@dataclass
class ActivationStats:
    """What calibration learns about one layer's input, streamed over every row (all spatial
    positions and tokens of every image):

    - ``mean_abs()``: per-channel mean magnitude (AWQ's scales);
    - ``hessian`` (with ``want_hessian``): ``H = sum x^T x`` over every row, in float64 (GPTQ);
    - ``sample()``: a uniform random sample of at most ``MAX_CALIBRATION_ROWS`` rows drawn
      from all batches (AWQ's clip search and the report's output errors).
    """

    want_hessian: bool = False
    abs_sum: torch.Tensor | None = None
    count: int = 0
    hessian: torch.Tensor | None = None
    _rows: torch.Tensor | None = None
    _keys: torch.Tensor | None = None

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        self.count += x.shape[0]
        if self.want_hessian:
            gram = (x.T @ x).double().cpu()
            self.hessian = gram if self.hessian is None else self.hessian + gram
        # Reservoir by random keys: the rows with the smallest keys over everything seen so far
        # are a uniform sample of all rows, whichever batch they came in.
        keys = torch.rand(x.shape[0], generator=generator)
        take = min(MAX_CALIBRATION_ROWS, x.shape[0])
        keys, index = keys.topk(take, largest=False)
        rows = x[index.to(x.device)].cpu()
        if self._rows is not None:
            assert self._keys is not None  # set together with _rows
            keys, rows = torch.cat([self._keys, keys]), torch.cat([self._rows, rows])
            if keys.numel() > MAX_CALIBRATION_ROWS:
                keys, index = keys.topk(MAX_CALIBRATION_ROWS, largest=False)
                rows = rows[index]
        self._keys, self._rows = keys, rows

    @property
    def kept_rows(self) -> int:
        return 0 if self._rows is None else self._rows.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return cast(torch.Tensor, self.abs_sum) / max(self.count, 1)  # set by add()

    def sample(self) -> torch.Tensor:
        return cast(torch.Tensor, self._rows)  # set by add(); callers check kept_rows


def _input_of(target: Target, args) -> torch.Tensor:
    x = args[0]
    if target.kind == "conv1x1":
        return x.permute(0, 2, 3, 1)  # channels last: rows are pixels
    if target.kind == "mha_in_proj" and not target.module.batch_first:
        return x.transpose(0, 1)
    return x


def register_input_hook(target: Target, callback):
    """Call ``callback(input)`` with the tensor the target's weight multiplies, on every forward.
    An nn.MultiheadAttention's out_proj is fed inside the attention's own forward: its input is
    recomputed by running the attention again with an identity output projection."""
    if target.attention is None:

        def hook(module, args, kwargs):
            callback(args[0] if args else kwargs["query"])

        return target.module.register_forward_pre_hook(hook, with_kwargs=True)
    busy = [False]

    def attention_hook(module, args, kwargs, output):
        if busy[0]:
            return
        projection = module.out_proj
        weight, bias = projection.weight.data, None if projection.bias is None else projection.bias.data
        busy[0] = True
        try:
            projection.weight.data = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
            if bias is not None:
                projection.bias.data = torch.zeros_like(bias)
            before_projection = module(*args, **{**kwargs, "need_weights": False})[0]
        finally:
            projection.weight.data = weight
            if bias is not None:
                projection.bias.data = bias
            busy[0] = False
        callback(before_projection)

    return target.attention.register_forward_hook(attention_hook, with_kwargs=True)


def run_images(model: LoadedModel, images_uint8: torch.Tensor) -> torch.Tensor:
    """The model's main output for a batch: image embeddings (CLIP) or class logits."""
    x = model.to_input(images_uint8)
    return model.adapter.forward_image(model.module, x)


def calibrate(
    model: LoadedModel,
    targets: list[Target],
    batches,
    texts: list[str] | None = None,
    text_batch: int = 64,
    want_hessian: bool = False,
) -> dict[str, ActivationStats]:
    """Collect activation statistics of every target over the uint8 image ``batches`` (and, for a
    CLIP text tower, over the ``texts``); ``want_hessian`` also accumulates GPTQ's ``X^T X``."""
    stats = {t.name: ActivationStats(want_hessian) for t in targets}
    generator = torch.Generator().manual_seed(0)
    handles = []
    for target in targets:
        handles.append(
            register_input_hook(
                target, lambda x, target=target: stats[target.name].add(_input_of(target, (x,)), generator)
            )
        )
    try:
        with torch.inference_mode():
            for images in batches:
                run_images(model, images)
            for start in range(0, len(texts or []), text_batch):
                model.encode_text(model.tokenize(texts[start : start + text_batch]))
    finally:
        for handle in handles:
            handle.remove()
    return stats


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------


@dataclass
class QuantizedLayer:
    target: Target
    weight: QuantizedWeight
    column_scale: torch.Tensor | None  # 1/s of AWQ, applied to the dequantized weight's columns
    alpha: float | None
    weight_error: float  # relative Frobenius error of the effective weight
    output_error: float  # relative MSE of the layer output on calibration rows (nan without rows)
    folded_into: str | None = None  # the LayerNorm that absorbed AWQ's scales (no column_scale then)
    method: str = "rtn"  # how this layer was quantized (rtn, awq, gptq)
    calibration_rows: int = 0  # input rows seen (every position and token of every image)
    validation_error: float | None = None  # --method auto: error of the chosen candidate on held-out inputs


def _output_error(w: torch.Tensor, w_hat: torch.Tensor, rows: torch.Tensor | None) -> float:
    if rows is None or rows.numel() == 0:
        return float("nan")
    reference = rows @ w.T
    return float(((rows @ w_hat.T - reference) ** 2).mean() / reference.pow(2).mean().clamp(min=1e-12))


def feeds_softmax(target: Target) -> bool:
    """Attention's query/key projections (packed or not): AWQ leaves them unclipped, since a
    clipped q or k distorts every attention weight."""
    return target.kind == "mha_in_proj" or target.name.rsplit(".", 1)[-1] in ("qkv", "q_proj", "k_proj", "q", "k")


METHODS = ("rtn", "awq", "gptq")  # what one layer is quantized with; --method auto chooses among them


def choose_layer(
    target: Target,
    bits: int,
    group_size: int | None,
    stats: ActivationStats | None,
    validation: ActivationStats | None,
    act_order: bool = False,
    awq_clip: bool = False,
) -> QuantizedLayer:
    """``--method auto`` for a layer outside any chain: every method, calibrated on ``stats``, and
    the one whose output error on the *validation* rows (inputs from images held out of the
    calibration) is lowest; RTN wins ties, so a method must beat plain rounding on unseen inputs."""
    rows = validation.sample().float() if validation is not None and validation.kept_rows else None
    best = None
    for method in METHODS:
        layer = quantize_layer(target, bits, group_size, method, stats, act_order, awq_clip)
        if rows is None:
            return layer  # nothing to choose with: rounding (the first method)
        error = _output_error(target.weight().float().cpu(), effective_weight(layer.weight, layer.column_scale), rows)
        if best is None or error < best.validation_error:
            layer.validation_error = error
            best = layer
    assert best is not None  # METHODS is not empty: the first method returns or sets best
    return best


def quantize_layer(
    target: Target,
    bits: int,
    group_size: int | None,
    method: str,
    stats: ActivationStats | None,
    act_order: bool = False,
    awq_clip: bool = False,
) -> QuantizedLayer:
    """One layer on its own: RTN; GPTQ on the sampled input rows; AWQ with the alpha search
    measured on this layer's output (an explicit input scale is kept). Without calibration rows,
    GPTQ and AWQ fall back to rounding."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (rtn, awq or gptq)")
    w = target.weight().float().cpu()
    rows = stats.sample().float() if stats is not None and stats.kept_rows else None
    column_scale, alpha = None, None
    used = method if rows is not None else "rtn"
    if method == "gptq" and rows is not None and stats.hessian is not None:
        quantized = gptq_quantize(w, stats.hessian, stats.count, bits, group_size, act_order=act_order)
        effective = quantized.dequantize()
    elif method == "awq" and rows is not None:
        reference = rows @ w.T
        energy = reference.pow(2).mean().clamp(min=1e-12)

        def evaluate(candidates):
            return float((rows @ candidates[0].T - reference).pow(2).mean() / energy)

        alpha, s, _ = search_scale([w], stats.mean_abs().float().cpu(), bits, group_size, evaluate)
        quantized, effective = awq_quantize(w, s, rows, bits, group_size, awq_clip and not feeds_softmax(target))
        column_scale = 1 / s
    else:
        used = "rtn"
        quantized = quantize_weight(w, bits, group_size)
        effective = quantized.dequantize()
    return QuantizedLayer(
        target,
        quantized,
        column_scale,
        alpha,
        float((effective - w).norm() / w.norm().clamp(min=1e-12)),
        _output_error(w, effective, rows),
        method=used,
        calibration_rows=stats.count if stats is not None else 0,
    )
