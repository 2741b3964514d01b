"""The quantize job: calibrate, quantize, measure on held-out images, write the file and report."""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch
import torch.nn.functional as F

from visbatch.core.engines import open_engine
from visbatch.core.errors import UsageError
from visbatch.core.images import ImageItem
from visbatch.core.models import LoadedModel
from visbatch.core.outputs import write_parquet
from visbatch.core.pipeline import RunConfig
from visbatch.core.tasks.quantize import (
    QuantizedWeightStore,
    calibrate,
    choose_layer,
    install,
    quantization_targets,
    quantize_layer,
    run_images,
    save_quantized,
)
from visbatch.core.tasks.quantize.blockwise import capture_chain_inputs, find_chains, quantize_chain


@dataclass
class QuantizeOptions:
    bits: int = 8
    group_size: int | None = 128  # None: per channel
    method: str = "auto"  # rtn | awq | gptq | auto (per block, the lowest error on held-out calibration images)
    towers: str = "visual"
    skip: list[str] = field(default_factory=list)
    act_order: bool = False
    awq_clip: bool = True  # AWQ's weight-clipping search
    labels: list[str] = field(default_factory=list)  # CLIP: zero-shot labels for label_agreement
    texts: list[str] = field(default_factory=list)  # calibration texts for a CLIP text tower


def _batches(
    items: Sequence[ImageItem], model: LoadedModel, config: RunConfig, what: str, unused: list[str] | None = None
) -> list[torch.Tensor]:
    """The decodable images of ``items`` as uint8 batches (the others' reasons appended to
    ``unused``); none at all is a usage error naming why."""
    batches, errors = [], []
    for batch in open_engine(config.engine).decode(items, model, config):
        if batch.images.shape[0]:
            batches.append(batch.images)
        errors += [f"{r.item.relpath}: {r.error}" for r in batch.records if r.status != "ok"]
    if not batches:
        raise UsageError(
            f"none of the {len(items)} {what} images could be decoded" + (f" (first: {errors[0]})" if errors else "")
        )
    if unused is not None:
        unused += [f"{what}: {error}" for error in errors]
    return batches


def _count(batches: list[torch.Tensor] | None) -> int:
    return sum(int(b.shape[0]) for b in batches or [])


@contextlib.contextmanager
def _running(model: LoadedModel, module: torch.nn.Module):
    """``model`` (its preprocessing, tokenizer and text trimming) with ``module`` as its network."""
    original = model.module
    model.module = module
    try:
        with torch.inference_mode():
            yield
    finally:
        model.module = original


def _outputs(model: LoadedModel, module: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with _running(model, module):
        return torch.cat([run_images(model, images).float().cpu() for images in batches])


def _zero_shot(model: LoadedModel, module: torch.nn.Module, labels: list[str], images: torch.Tensor) -> torch.Tensor:
    """Index of the best label per image with ``module``'s own text tower (quantized or not)."""
    from visbatch.core.texts import DEFAULT_TEMPLATE, fill_template

    with _running(model, module):
        texts = model.encode_text(model.tokenize([fill_template(DEFAULT_TEMPLATE, label) for label in labels])).float()
    return (F.normalize(images, dim=-1) @ F.normalize(texts.cpu(), dim=-1).T).argmax(dim=1)


def _throughput(model: LoadedModel, module: torch.nn.Module, batch: torch.Tensor, repeats: int = 3) -> float:
    _outputs(model, module, [batch])  # warm-up (and the speed-mode weight cache)
    start = time.perf_counter()
    for _ in range(repeats):
        _outputs(model, module, [batch])
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def _drivers(model: LoadedModel, batches: list[torch.Tensor], texts: list[str], tower: str):
    """A function giving one call per batch (images, or chunks of texts for a CLIP text tower)."""
    if tower == "text":
        chunks = [texts[i : i + 64] for i in range(0, len(texts), 64)]
        return lambda: (lambda chunk=chunk: model.encode_text(model.tokenize(chunk)) for chunk in chunks)
    return lambda: (lambda images=images: run_images(model, images) for images in batches)


def quantize_targets(
    model: LoadedModel,
    targets: list,
    calib_batches: list[torch.Tensor],
    texts: list[str],
    options: QuantizeOptions,
    validation_batches: list[torch.Tensor] | None = None,
    validation_texts: list[str] | None = None,
) -> tuple[list, dict[str, torch.Tensor]]:
    """Quantize every target: block by block inside chains (bounded memory, AWQ measured on block
    outputs), one pass for the rest. With ``method="auto"`` each block (or loose layer) keeps the
    method with the lowest error on the validation images/texts (held out of the calibration).
    Returns (layers, parameter overrides of folded LayerNorms)."""
    auto = options.method == "auto"
    chains, loose = find_chains(model, targets)
    layers, overrides = [], {}
    for chain in chains:
        chain_targets = [t for t in targets if t.name.startswith(chain.container + ".")]
        if chain.tower == "text" and not texts:
            loose += chain_targets  # no calibration texts: rounded to nearest below
            continue
        inputs = capture_chain_inputs(chain, _drivers(model, calib_batches, texts, chain.tower))
        validation = None
        if inputs is not None and auto:
            validation = capture_chain_inputs(
                chain, _drivers(model, validation_batches or calib_batches, validation_texts or texts, chain.tower)
            )
        if inputs is None or (auto and validation is None):
            loose += chain_targets
            continue
        chain_layers, chain_overrides = quantize_chain(
            chain,
            chain_targets,
            inputs,
            options.bits,
            options.group_size,
            options.method,
            options.act_order,
            options.awq_clip,
            validation=validation,
            root=model.module,
        )
        layers += chain_layers
        overrides.update(chain_overrides)
    text_names = {t.name for t in targets if model.adapter.tower_of(t.name) == "text"}
    calibrated = [t for t in loose if t.name not in text_names or texts]
    want_hessian = options.method in ("gptq", "auto")
    stats = calibrate(model, calibrated, calib_batches, texts, want_hessian=want_hessian) if calibrated else {}
    held = (
        calibrate(model, calibrated, validation_batches or calib_batches, validation_texts or texts)
        if calibrated and auto
        else {}
    )
    for target in loose:
        if target.name not in stats:  # without calibration texts the text tower is rounded to nearest
            layers.append(quantize_layer(target, options.bits, options.group_size, "rtn", None))
        elif auto:
            layers.append(
                choose_layer(
                    target,
                    options.bits,
                    options.group_size,
                    stats[target.name],
                    held.get(target.name),
                    options.act_order,
                    options.awq_clip,
                )
            )
        else:
            layers.append(
                quantize_layer(
                    target,
                    options.bits,
                    options.group_size,
                    options.method,
                    stats[target.name],
                    options.act_order,
                    options.awq_clip,
                )
            )
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(layers, key=lambda layer: order[layer.target.name]), overrides


def apply_overrides(module: torch.nn.Module, overrides: dict[str, torch.Tensor]) -> None:
    """Copy folded LayerNorm parameters into ``module``."""
    with torch.no_grad():
        for name, value in overrides.items():
            module.get_parameter(name).copy_(value)


def split_validation(items: Sequence, fraction: float = 0.25, seed: int = 0) -> tuple[list, list]:
    """(calibration, validation): a deterministic ``fraction`` of ``items`` (at least one) held out
    of the calibration for ``--method auto`` to choose on; with a single item both are that item."""
    items = list(items)
    if len(items) < 2:
        return items, items
    shuffled = items[:]
    random.Random(seed).shuffle(shuffled)
    cut = max(1, round(len(shuffled) * fraction))
    return sorted(shuffled[cut:], key=str), sorted(shuffled[:cut], key=str)


def _installed(model: LoadedModel, layers: list, overrides: dict) -> torch.nn.Module:
    module = copy.deepcopy(model.module)
    apply_overrides(module, overrides)
    install(
        module,
        {
            layer.target.name: (layer.target.kind, QuantizedWeightStore(layer.weight, layer.column_scale))
            for layer in layers
        },
    )
    return module.to(model.device)


def _agreement(
    model: LoadedModel, options: QuantizeOptions, before: torch.Tensor, after: torch.Tensor, module: torch.nn.Module
) -> dict:
    if "class_logits" in model.capabilities:
        return {"top1_agreement": float((before.argmax(1) == after.argmax(1)).float().mean())}
    if options.labels:
        return {
            "label_agreement": float(
                (
                    _zero_shot(model, model.module, options.labels, before)
                    == _zero_shot(model, module, options.labels, after)
                )
                .float()
                .mean()
            )
        }
    return {}


def run_quantize(
    model: LoadedModel,
    calib: Sequence[ImageItem],
    held_out: Sequence[ImageItem],
    output: str,
    options: QuantizeOptions,
    config: RunConfig,
) -> dict:
    """Quantize ``model`` and write ``output``; returns the report (end-to-end figures and layers).

    The figures are measured on ``held_out`` images, none of which calibrated anything. With
    ``method="auto"`` a quarter of ``calib`` is held out of the calibration for the per-block
    choice, so the choice is not made on the images that report it either. The report compares
    the result with plain rounding (RTN) on the same held-out images: ``worse_than_rtn``.
    """
    targets, kept = quantization_targets(model, options.towers, options.skip)
    if not targets:
        raise UsageError(f"nothing to quantize in {model.spec} (towers={options.towers}, skip={options.skip})")
    text_targets = [t for t in targets if model.adapter.tower_of(t.name) == "text"]
    texts = options.texts if text_targets else []
    validation_items: list[ImageItem] = []
    validation_texts: list[str] = []
    if options.method == "auto":
        calib, validation_items = split_validation(calib)
        texts, validation_texts = split_validation(texts) if texts else ([], [])
    unused: list[str] = []  # files that could not be decoded: counted nowhere, reported
    calib_batches = _batches(calib, model, config, "calibration", unused)
    validation_batches = _batches(validation_items, model, config, "validation", unused) if validation_items else None
    eval_batches = _batches(held_out, model, config, "held-out", unused)
    layers, overrides = quantize_targets(
        model, targets, calib_batches, texts, options, validation_batches, validation_texts
    )
    quantized_module = _installed(model, layers, overrides)
    before = _outputs(model, model.module, eval_batches)
    after = _outputs(model, quantized_module, eval_batches)
    cosine = F.cosine_similarity(before, after, dim=1)
    methods = sorted({layer.method for layer in layers})
    report = {
        "method": options.method,
        "bits": options.bits,
        "group_size": options.group_size or "channel",
        "towers": options.towers,
        "quantized_layers": len(layers),
        "kept_layers": len(kept),
        "layers_by_method": {m: sum(layer.method == m for layer in layers) for m in methods},
        "calibration_images": _count(calib_batches),
        "validation_images": _count(validation_batches),
        "unreadable_images": len(unused),
        "unreadable_examples": unused[:5],
        "eval_images": int(before.shape[0]),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "output_mse": float(((before - after) ** 2).mean()),
        **_agreement(model, options, before, after, quantized_module),
    }
    if methods != ["rtn"]:
        rtn_layers = [quantize_layer(t, options.bits, options.group_size, "rtn", None) for t in targets]
        rtn_module = _installed(model, rtn_layers, {})
        rtn_after = _outputs(model, rtn_module, eval_batches)
        report["rtn_cosine_min"] = float(F.cosine_similarity(before, rtn_after, dim=1).min())
        report["rtn_output_mse"] = float(((before - rtn_after) ** 2).mean())
        report.update({f"rtn_{k}": v for k, v in _agreement(model, options, before, rtn_after, rtn_module).items()})
        report["worse_than_rtn"] = report["output_mse"] > report["rtn_output_mse"]
        del rtn_module
    else:
        report["worse_than_rtn"] = False
    report["bytes_before"] = int(sum(t.numel() * t.element_size() for t in model.module.state_dict().values()))
    calibration = {
        "images": _count(calib_batches),
        "validation_images": _count(validation_batches),
        "texts": len(texts),
    }
    file_config = {
        "method": options.method,
        "act_order": options.act_order,
        "awq_clip": options.awq_clip,
        "bits": options.bits,
        "group_size": options.group_size,
        "towers": options.towers,
        "skip": options.skip,
        "calibration": calibration,
        "kept": [f"{name}: {why}" for name, why in kept],
    }
    report["bytes_after"] = save_quantized(output, model, layers, file_config, overrides)
    if eval_batches:
        report["images_per_s_before"] = _throughput(model, model.module, eval_batches[0])
        report["images_per_s_after"] = _throughput(model, quantized_module, eval_batches[0])
    report["layers"] = [
        {
            "layer": layer.target.name,
            "kind": layer.target.kind,
            "shape": list(layer.weight.shape),
            "method": layer.method,
            "alpha": layer.alpha,
            "scales_folded_into": layer.folded_into,
            "calibration_rows": layer.calibration_rows,
            "rows_per_width": layer.calibration_rows / max(layer.weight.shape[1], 1),
            "weight_error": layer.weight_error,
            "output_error": layer.output_error,
            "validation_error": layer.validation_error,
        }
        for layer in layers
    ]
    report["kept"] = [{"layer": name, "reason": why} for name, why in kept]
    return report


REPORT_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("shape", pa.list_(pa.int64())),
        pa.field("method", pa.string()),
        pa.field("alpha", pa.float64()),
        pa.field("scales_folded_into", pa.string()),
        pa.field("calibration_rows", pa.int64()),
        pa.field("rows_per_width", pa.float64()),
        pa.field("weight_error", pa.float64()),
        pa.field("output_error", pa.float64()),
        pa.field("validation_error", pa.float64()),
    ]
)


def write_report(path: str, report: dict) -> None:
    """Per-layer Parquet report (kept layers as rows saying why) with the end-to-end figures in
    its metadata; undefined figures are null."""
    from visbatch.core.pipeline import json_safe

    rows = report["layers"] + [{"layer": k["layer"], "kind": "kept: " + k["reason"]} for k in report["kept"]]
    rows = [{f.name: json_safe(row.get(f.name)) for f in REPORT_SCHEMA} for row in rows]
    table = pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)
    summary = json_safe({k: v for k, v in report.items() if k not in ("layers", "kept")})
    from visbatch.core import __version__

    write_parquet(path, table, {"task": "quantize", "visbatch_version": __version__, **summary})
