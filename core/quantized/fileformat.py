"""The quantized model file: safetensors with packed weights, fp16 scales, uint8 zero points and
JSON metadata, written by ``visbatch quantize`` and loaded by every subcommand (registered with
:func:`visbatch.core.models.register_weight_file_format`)."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from visbatch.core.errors import UsageError
from visbatch.core.files import atomic_path
from visbatch.core.models import LoadedModel, ModelError, file_checksum, resolve_device, resolve_precision
from visbatch.core.quantized.runtime import QuantizedWeightStore, install
from visbatch.core.quantized.weights import QuantizedWeight

FORMAT_NAME = "visbatch-quantized"
FORMAT_VERSION = 1
# How the integers are laid out, recorded in every file and checked on load.
LAYOUT = (
    "rows=out_features; int8: uint8 [out, in]; int4: uint8 [out, ceil(in/2)], even column in the low nibble; "
    "scales fp16 [out, groups], zeros uint8 [out, groups]; w = (q - zero) * scale; "
    "column_scale fp32 [in] multiplies the weight's columns"
)


def save_quantized(
    path: str,
    model: LoadedModel,
    layers: list,  # the quantize task's QuantizedLayer: target, weight, column_scale, method, ...
    config: dict,
    overrides: dict[str, torch.Tensor] | None = None,
) -> int:
    """Write the file atomically; returns its size in bytes. ``overrides`` replace kept tensors
    (LayerNorm parameters that absorbed AWQ's scales)."""
    from safetensors.torch import save_file

    quantized_weights = {
        f"{layer.target.name}.weight" if layer.target.kind != "mha_in_proj" else f"{layer.target.name}.in_proj_weight"
        for layer in layers
    }
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items() if k not in quantized_weights
    }
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
        layer_meta[layer.target.name] = {
            "kind": layer.target.kind,
            "shape": list(layer.weight.shape),
            "group_size": layer.weight.group_size,
            "alpha": layer.alpha,
            "scales_folded_into": layer.folded_into,
        }
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
        raise ModelError(
            f"{path} is a safetensors file but not one written by visbatch quantize; "
            "pass plain weights with --pretrained instead"
        )
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

    from visbatch.core.models import load_model
    from visbatch.core.models.loaders import _finish

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
            weight = QuantizedWeight(
                tensors.pop(f"{prefix}.qweight"),
                tensors.pop(f"{prefix}.scales").float(),
                tensors.pop(f"{prefix}.zeros"),
                config["bits"],
                info["group_size"],
                tuple(info["shape"]),
            )
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
    missing = [
        k for k in missing if ".store." not in k and "in_proj_store" not in k and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected:
        raise ModelError(f"{path} does not fit {spec}: missing {missing[:3]}, unexpected {unexpected[:3]}")
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
            raise ModelError(
                f"{path}: metadata of quantized layer {name} is invalid "
                f"(shape {shape}, group size {group}, kind {kind!r})"
            )


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


def check_quantized_tensors(
    path: str,
    name: str,
    weight: QuantizedWeight,
    column_scale: torch.Tensor | None,
    expected_shape: tuple[int, int] | None,
) -> None:
    """Refuse tensors that do not match what the metadata says (shapes, dtypes, bit width, finite
    positive scales), so a damaged or hand-edited file fails to load instead of giving garbage."""
    out_features, in_features = weight.shape
    levels = 2**weight.bits - 1
    groups = -(-in_features // weight.group_size)
    packed_columns = -(-in_features // 2) if weight.bits == 4 else in_features
    problems = []
    if expected_shape is not None and tuple(expected_shape) != (out_features, in_features):
        problems.append(f"the model's layer is {list(expected_shape)}, the file says {[out_features, in_features]}")
    if weight.qweight.dtype != torch.uint8 or tuple(weight.qweight.shape) != (out_features, packed_columns):
        problems.append(
            f"qweight is {weight.qweight.dtype} {list(weight.qweight.shape)}, expected uint8 "
            f"{[out_features, packed_columns]} for int{weight.bits}"
        )
    if tuple(weight.scales.shape) != (out_features, groups):
        problems.append(f"scales are {list(weight.scales.shape)}, expected {[out_features, groups]}")
    elif not bool(torch.isfinite(weight.scales).all()) or bool((weight.scales < 0).any()):
        problems.append("scales hold NaN, inf or negative values")
    if weight.zeros.dtype != torch.uint8 or tuple(weight.zeros.shape) != (out_features, groups):
        problems.append(
            f"zero points are {weight.zeros.dtype} {list(weight.zeros.shape)}, expected uint8 {[out_features, groups]}"
        )
    elif bool((weight.zeros > levels).any()):
        problems.append(f"zero points exceed {levels}, the largest int{weight.bits} value")
    if column_scale is not None and (
        tuple(column_scale.shape) != (in_features,) or not bool(torch.isfinite(column_scale).all())
    ):
        problems.append("column scales do not match the layer or are not finite")
    if problems:
        raise ModelError(
            f"{path}: quantized layer {name}: {problems[0]}; the file is damaged or was not written by this visbatch"
        )


def describe_file(path: str) -> dict:
    """What a quantized file holds (for ``visbatch quantize --inspect``)."""
    config = read_quantized_config(path)
    kinds: dict[str, int] = {}
    for info in config["layers"].values():
        kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
    return {
        "file": path,
        "bytes": os.path.getsize(path),
        "method": config["method"],
        "bits": config["bits"],
        "group_size": config.get("group_size"),
        "layout": config["layout"],
        "source_model": config["source"].get("spec"),
        "source_checksum": config["source"].get("checksum"),
        "towers": config.get("towers"),
        "quantized_layers": len(config["layers"]),
        "layer_kinds": kinds,
        "kept_layers": config.get("kept", []),
        "calibration": config.get("calibration"),
    }


def is_quantized_file(path: str) -> bool:
    """Whether ``path`` is offered to :func:`load_quantized`: a ``.safetensors`` file (a
    safetensors file of another kind gets a clear error there, not a guess)."""
    return path.endswith(".safetensors")
