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
- :class:`QuantizedWeightStore`, :class:`QuantLinear`, :class:`QuantConv1x1`:
  the runtime layers (``speed`` caches the dequantized weight, ``memory``
  does not).
- :func:`save_quantized` / :func:`load_quantized`: safetensors with packed
  weights, fp16 scales, uint8 zero points and JSON metadata; loaded by
  :func:`visbatch.core.models.load_model` for any ``--model FILE.safetensors``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visbatch.core.errors import UsageError
from visbatch.core.files import atomic_path
from visbatch.core.models import LoadedModel, ModelError, file_checksum
from visbatch.core.tasks.quantize.awq import awq_quantize, search_scale
from visbatch.core.tasks.quantize.kernels import Int4Kernel, int4_kernel_applies, verified_kernel
from visbatch.core.tasks.quantize.quant import QuantizedWeight, gptq_quantize, quantize_weight

FORMAT_NAME = "visbatch-quantized"
FORMAT_VERSION = 1
# How the integers are laid out, recorded in every file and checked on load.
LAYOUT = ("rows=out_features; int8: uint8 [out, in]; int4: uint8 [out, ceil(in/2)], even column in the low nibble; "
          "scales fp16 [out, groups], zeros uint8 [out, groups]; w = (q - zero) * scale; "
          "column_scale fp32 [in] multiplies the weight's columns")
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
        return self.module.weight.detach().reshape(self.module.weight.shape[0], -1)


def quantization_targets(model: LoadedModel, towers: str = "visual", skip: list[str] | None = None
                         ) -> tuple[list[Target], list[tuple[str, str]]]:
    """(targets, [(name, why kept)]) for ``towers`` = visual | text | all."""
    skip = skip or []
    module = model.module
    targets, kept = [], []
    if model.family == "open_clip":
        prefixes = {"visual": ["visual."], "text": ["transformer."], "all": ["visual.", "transformer."]}[towers]
    else:
        if towers == "text":
            raise UsageError(f"{model.spec} has no text tower")
        prefixes = [""]
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
                kept.append((name, f"conv {child.kernel_size[0]}x{child.kernel_size[1]}"
                             + (" depthwise" if child.groups > 1 else "") + " (only 1x1 convolutions are quantized)"))
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
    if model.family == "open_clip":
        embeddings = {"visual": ["visual.conv1", "visual.positional_embedding", "visual.proj"],
                      "text": ["token_embedding", "positional_embedding", "text_projection"]}
        for tower in ("visual", "text") if towers == "all" else (towers,):
            kept += [(name, "embedding/projection (kept in full precision)") for name in embeddings[tower]
                     if name not in {k for k, _ in kept}]
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
            keys, rows = torch.cat([self._keys, keys]), torch.cat([self._rows, rows])
            if keys.numel() > MAX_CALIBRATION_ROWS:
                keys, index = keys.topk(MAX_CALIBRATION_ROWS, largest=False)
                rows = rows[index]
        self._keys, self._rows = keys, rows

    @property
    def kept_rows(self) -> int:
        return 0 if self._rows is None else self._rows.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def sample(self) -> torch.Tensor:
        return self._rows


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
    return model.module.encode_image(x) if model.family == "open_clip" else model.module(x)


def calibrate(model: LoadedModel, targets: list[Target], batches, texts: list[str] | None = None,
              text_batch: int = 64, want_hessian: bool = False) -> dict[str, ActivationStats]:
    """Collect activation statistics of every target over the uint8 image ``batches`` (and, for a
    CLIP text tower, over the ``texts``); ``want_hessian`` also accumulates GPTQ's ``X^T X``."""
    stats = {t.name: ActivationStats(want_hessian) for t in targets}
    generator = torch.Generator().manual_seed(0)
    handles = []
    for target in targets:
        handles.append(register_input_hook(
            target, lambda x, target=target: stats[target.name].add(_input_of(target, (x,)), generator)))
    try:
        with torch.inference_mode():
            for images in batches:
                run_images(model, images)
            for start in range(0, len(texts or []), text_batch):
                model.encode_text(model.tokenize(texts[start:start + text_batch]))
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


def effective_weight(weight: QuantizedWeight, column_scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    w = weight.dequantize(torch.float32)
    if column_scale is not None:
        w = w * column_scale.float().view(1, -1)
    return w.to(dtype)


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


def choose_layer(target: Target, bits: int, group_size: int | None, stats: ActivationStats | None,
                 validation: ActivationStats | None, act_order: bool = False, awq_clip: bool = False
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
    return best


def quantize_layer(target: Target, bits: int, group_size: int | None, method: str,
                   stats: ActivationStats | None, act_order: bool = False, awq_clip: bool = False
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
    return QuantizedLayer(target, quantized, column_scale, alpha,
                          float((effective - w).norm() / w.norm().clamp(min=1e-12)),
                          _output_error(w, effective, rows), method=used,
                          calibration_rows=stats.count if stats is not None else 0)


# ----------------------------------------------------------------------------
# Runtime modules
# ----------------------------------------------------------------------------


class QuantizedWeightStore(nn.Module):
    """Holds a packed weight; materializes the effective weight (cached in ``speed`` mode)."""

    def __init__(self, weight: QuantizedWeight, column_scale: torch.Tensor | None, runtime: str = "speed"):
        super().__init__()
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales.half())
        self.register_buffer("zeros", weight.zeros)
        if column_scale is not None:
            self.register_buffer("column_scale", column_scale.float())
        else:
            self.column_scale = None
        self.bits, self.group_size, self.shape = weight.bits, weight.group_size, tuple(weight.shape)
        self.runtime = runtime
        self._cache: torch.Tensor | None = None
        self._kernel = None  # Int4Kernel, or False once found unusable; memory mode on CUDA only

    def kernel_for(self, x: torch.Tensor):
        """The packed int4 CUDA kernel for a bf16 input in ``memory`` mode, verified on first use;
        None means dequantize-then-matmul (see :mod:`~visbatch.core.tasks.quantize.kernels`)."""
        if self.runtime != "memory" or x.dtype != torch.bfloat16 or self._kernel is False:
            return None
        if not int4_kernel_applies(self.bits, self.group_size, self.shape, x.device):
            return None
        if self._kernel is None:
            reference = effective_weight(self._packed(), self.column_scale, torch.float32).to(x.device)
            self._kernel = verified_kernel(
                lambda: Int4Kernel(self.qweight, self.scales, self.zeros, self.group_size, self.shape,
                                   self.column_scale, x.device),
                reference, self.shape[1], x.device) or False
        return self._kernel or None

    def _packed(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales.float(), self.zeros, self.bits, self.group_size, self.shape)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        if self._cache is not None and self._cache.dtype == dtype and self._cache.device == self.qweight.device:
            return self._cache
        # Built outside inference mode even when called inside it: a weight cached by an
        # inference pass is then also usable by a pass that takes gradients (saliency).
        with torch.inference_mode(False):
            w = effective_weight(self._packed(), self.column_scale, dtype)
        if self.runtime == "speed":
            self._cache = w
        return w


class QuantLinear(nn.Module):
    def __init__(self, store: QuantizedWeightStore, bias: torch.Tensor | None):
        super().__init__()
        self.store = store
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = store.shape

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads ``.weight`` directly (nn.MultiheadAttention's
        out_proj is used that way)."""
        return self.store.materialize(self.bias.dtype if self.bias is not None else torch.float32)

    def forward(self, x):
        kernel = self.store.kernel_for(x)
        if kernel is not None:
            out = kernel(x)
            return out + self.bias.to(out.dtype) if self.bias is not None else out
        return F.linear(x, self.store.materialize(x.dtype), self.bias)


class QuantConv1x1(nn.Module):
    def __init__(self, store: QuantizedWeightStore, bias, stride, padding, dilation):
        super().__init__()
        self.store = store
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.out_channels, self.in_channels = store.shape

    def forward(self, x):
        w = self.store.materialize(x.dtype).view(*self.store.shape, 1, 1)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _install_mha(module: nn.MultiheadAttention, store: QuantizedWeightStore) -> None:
    """Attention keeps its module; its packed in_proj_weight is materialized before each call."""
    del module.in_proj_weight
    module.in_proj_store = store
    module.in_proj_weight = None

    def materialize(mod, args, kwargs):
        dtype = args[0].dtype if args else kwargs["query"].dtype
        mod.in_proj_weight = mod.in_proj_store.materialize(dtype)

    module.register_forward_pre_hook(materialize, with_kwargs=True)


def install(model: nn.Module, layers: dict[str, tuple[str, QuantizedWeightStore]]) -> None:
    """Replace each quantized layer (name -> (kind, store)) in ``model``."""
    for name, (kind, store) in layers.items():
        original = model.get_submodule(name)
        if kind == "linear":
            _set_submodule(model, name, QuantLinear(store, original.bias))
        elif kind == "conv1x1":
            _set_submodule(model, name, QuantConv1x1(store, original.bias, original.stride, original.padding,
                                                     original.dilation))
        elif kind == "mha_in_proj":
            _install_mha(original, store)
        else:
            raise ModelError(f"unknown quantized layer kind {kind!r}")


# ----------------------------------------------------------------------------
# File format
# ----------------------------------------------------------------------------


def save_quantized(path: str, model: LoadedModel, layers: list[QuantizedLayer], config: dict,
                   overrides: dict[str, torch.Tensor] | None = None) -> int:
    """Write the file atomically; returns its size in bytes. ``overrides`` replace kept tensors
    (LayerNorm parameters that absorbed AWQ's scales)."""
    from safetensors.torch import save_file

    quantized_weights = {f"{layer.target.name}.weight" if layer.target.kind != "mha_in_proj"
                         else f"{layer.target.name}.in_proj_weight" for layer in layers}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()
               if k not in quantized_weights}
    for name, value in (overrides or {}).items():
        tensors[name] = value.detach().cpu().contiguous()
    layer_meta = {}
    for layer in layers:
        prefix = f"__quant__.{layer.target.name}"
        tensors[f"{prefix}.qweight"] = layer.weight.qweight.contiguous()
        tensors[f"{prefix}.scales"] = layer.weight.scales.half().contiguous()
        tensors[f"{prefix}.zeros"] = layer.weight.zeros.contiguous()
        if layer.column_scale is not None:
            tensors[f"{prefix}.column_scale"] = layer.column_scale.float().contiguous()
        layer_meta[layer.target.name] = {"kind": layer.target.kind, "shape": list(layer.weight.shape),
                                         "group_size": layer.weight.group_size, "alpha": layer.alpha,
                                         "scales_folded_into": layer.folded_into}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps({**config, "layout": LAYOUT, "layers": layer_meta, "source": model.describe()}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return os.path.getsize(path)


def read_quantized_config(path: str) -> dict:
    """The metadata of a quantized file, validated. Raises ModelError with a clear message."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}")
    if metadata.get("format") != FORMAT_NAME:
        raise ModelError(f"{path} is a safetensors file but not one written by visbatch quantize; "
                         "pass plain weights with --pretrained instead")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ModelError(f"{path} has format version {version}; this visbatch reads version {FORMAT_VERSION}")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError):
        raise ModelError(f"{path}: quantization metadata is missing or corrupt")
    for key in ("method", "bits", "source", "layers", "layout"):
        if key not in config:
            raise ModelError(f"{path}: quantization metadata has no {key!r}")
    if config["layout"] != LAYOUT:
        raise ModelError(f"{path}: unknown weight layout {config['layout']!r}; this visbatch reads {LAYOUT!r}")
    if config["bits"] not in (4, 8):
        raise ModelError(f"{path}: unsupported bit width {config['bits']}")
    return config


def load_quantized(path: str, device, precision: str, runtime: str | None = None) -> LoadedModel:
    """Rebuild the source architecture, load the kept tensors and install the quantized layers."""
    from safetensors.torch import load_file

    from visbatch.core.models import _finish, load_model

    config = read_quantized_config(path)
    _check_layer_metadata(path, config)
    source = config["source"]
    runtime = runtime or os.environ.get("VISBATCH_RUNTIME", "speed")
    if runtime not in ("speed", "memory"):
        raise UsageError(f"runtime must be speed or memory, not {runtime!r}")
    spec = source["spec"]
    base_pretrained = "none" if spec.startswith("timm:") else None
    model = load_model(spec, base_pretrained, device="cpu", precision="fp32")
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:
        raise ModelError(f"{path}: cannot read its tensors: {str(exc).splitlines()[0]}")
    layers = {}
    for name, info in config["layers"].items():
        prefix = f"__quant__.{name}"
        try:
            weight = QuantizedWeight(tensors.pop(f"{prefix}.qweight"), tensors.pop(f"{prefix}.scales").float(),
                                     tensors.pop(f"{prefix}.zeros"), config["bits"], info["group_size"],
                                     tuple(info["shape"]))
        except KeyError as exc:
            raise ModelError(f"{path}: tensors of quantized layer {name} are missing ({exc})")
        column_scale = tensors.pop(f"{prefix}.column_scale", None)
        check_quantized_tensors(path, name, weight, column_scale, _target_shape(model.module, name, info["kind"]))
        layers[name] = (info["kind"], QuantizedWeightStore(weight, column_scale, runtime))
    if any(k.startswith("__quant__.") for k in tensors):
        raise ModelError(f"{path}: quantized tensors without metadata")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path}: tensor {key} holds NaN or inf values")
    try:
        install(model.module, layers)
    except AttributeError as exc:
        raise ModelError(f"{path}: does not fit {spec}: {exc}")
    try:
        missing, unexpected = model.module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3]) or str(exc)
        raise ModelError(f"{path} does not fit {spec}: {detail[:300]}")
    missing = [k for k in missing if ".store." not in k and "in_proj_store" not in k
               and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelError(f"{path} does not fit {spec}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    from visbatch.core.models import resolve_device, resolve_precision

    model.device = device if isinstance(device, torch.device) else resolve_device(device)
    model.dtype = resolve_precision(precision, model.device)
    model.spec = path
    model.pretrained = None
    model.checksum = file_checksum(path)
    model.is_random = bool(source.get("random_weights"))
    model.notes.append(f"quantized {config['method']} int{config['bits']} from {spec}")
    for store in model.module.modules():
        if isinstance(store, QuantizedWeightStore):
            store._cache = None
    return _finish(model)


def _check_layer_metadata(path: str, config: dict) -> None:
    if not isinstance(config["layers"], dict):
        raise ModelError(f"{path}: quantization metadata 'layers' is not a mapping")
    for name, info in config["layers"].items():
        try:
            shape = [int(v) for v in info["shape"]]
            group = int(info["group_size"])
            kind = info["kind"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: metadata of quantized layer {name} is incomplete")
        if len(shape) != 2 or min(shape) < 1 or group < 1 or kind not in ("linear", "conv1x1", "mha_in_proj"):
            raise ModelError(f"{path}: metadata of quantized layer {name} is invalid "
                             f"(shape {shape}, group size {group}, kind {kind!r})")


def _target_shape(module: nn.Module, name: str, kind: str) -> tuple[int, int] | None:
    """[out, in] of the weight the quantized layer ``name`` replaces in the rebuilt model."""
    try:
        child = module.get_submodule(name)
    except AttributeError:
        return None
    weight = child.in_proj_weight if kind == "mha_in_proj" else getattr(child, "weight", None)
    if weight is None:
        return None
    return (int(weight.shape[0]), int(weight[0].numel()))


def check_quantized_tensors(path: str, name: str, weight: QuantizedWeight, column_scale: torch.Tensor | None,
                            expected_shape: tuple[int, int] | None) -> None:
    """Refuse tensors that do not match what the metadata says (shapes, dtypes, bit width, finite
    positive scales), so a damaged or hand-edited file fails to load instead of giving garbage."""
    out_features, in_features = weight.shape
    levels = 2 ** weight.bits - 1
    groups = -(-in_features // weight.group_size)
    packed_columns = -(-in_features // 2) if weight.bits == 4 else in_features
    problems = []
    if expected_shape is not None and tuple(expected_shape) != (out_features, in_features):
        problems.append(f"the model's layer is {list(expected_shape)}, the file says {[out_features, in_features]}")
    if weight.qweight.dtype != torch.uint8 or tuple(weight.qweight.shape) != (out_features, packed_columns):
        problems.append(f"qweight is {weight.qweight.dtype} {list(weight.qweight.shape)}, expected uint8 "
                        f"{[out_features, packed_columns]} for int{weight.bits}")
    if tuple(weight.scales.shape) != (out_features, groups):
        problems.append(f"scales are {list(weight.scales.shape)}, expected {[out_features, groups]}")
    elif not bool(torch.isfinite(weight.scales).all()) or bool((weight.scales < 0).any()):
        problems.append("scales hold NaN, inf or negative values")
    if weight.zeros.dtype != torch.uint8 or tuple(weight.zeros.shape) != (out_features, groups):
        problems.append(f"zero points are {weight.zeros.dtype} {list(weight.zeros.shape)}, expected uint8 "
                        f"{[out_features, groups]}")
    elif bool((weight.zeros > levels).any()):
        problems.append(f"zero points exceed {levels}, the largest int{weight.bits} value")
    if column_scale is not None and (tuple(column_scale.shape) != (in_features,)
                                     or not bool(torch.isfinite(column_scale).all())):
        problems.append("column scales do not match the layer or are not finite")
    if problems:
        raise ModelError(f"{path}: quantized layer {name}: {problems[0]}; the file is damaged or was not "
                         "written by this visbatch")


def describe_file(path: str) -> dict:
    """What a quantized file holds (for ``visbatch quantize --inspect``)."""
    config = read_quantized_config(path)
    kinds: dict[str, int] = {}
    for info in config["layers"].values():
        kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
    return {"file": path, "bytes": os.path.getsize(path), "method": config["method"], "bits": config["bits"],
            "group_size": config.get("group_size"), "layout": config["layout"], "source_model": config["source"].get("spec"),
            "source_checksum": config["source"].get("checksum"), "towers": config.get("towers"),
            "quantized_layers": len(config["layers"]), "layer_kinds": kinds,
            "kept_layers": config.get("kept", []), "calibration": config.get("calibration")}
