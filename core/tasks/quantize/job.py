"""The quantize job: calibrate, quantize, measure on held-out images, write the file and report."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import torch
import torch.nn.functional as F

from visbatch.core.errors import UsageError
from visbatch.core.images import ImageItem
from visbatch.core.models import LoadedModel
from visbatch.core.outputs import write_parquet
from visbatch.core.pipeline import RunConfig, make_loader
from visbatch.core.tasks.quantize import (
    QuantizedWeightStore,
    calibrate,
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
    method: str = "gptq"
    towers: str = "visual"
    skip: list[str] = field(default_factory=list)
    act_order: bool = False
    awq_clip: bool = True  # AWQ's weight-clipping search
    labels: list[str] = field(default_factory=list)  # CLIP: zero-shot labels for label_agreement
    texts: list[str] = field(default_factory=list)  # calibration texts for a CLIP text tower


def _batches(items: Sequence[ImageItem], model: LoadedModel, config: RunConfig, what: str) -> list[torch.Tensor]:
    """The decodable images of ``items`` as uint8 batches; none at all is a usage error naming why."""
    batches, errors = [], []
    for batch in make_loader(items, model, config):
        if batch.images.shape[0]:
            batches.append(batch.images)
        errors += [f"{r.item.relpath}: {r.error}" for r in batch.records if r.status != "ok"]
    if not batches:
        raise UsageError(f"none of the {len(items)} {what} images could be decoded"
                         + (f" (first: {errors[0]})" if errors else ""))
    return batches


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
    from visbatch.core.tasks.clip_score import DEFAULT_TEMPLATE, fill_template

    with _running(model, module):
        texts = model.encode_text(model.tokenize([fill_template(DEFAULT_TEMPLATE, label) for label in labels])).float()
    return (F.normalize(images, dim=-1) @ F.normalize(texts.cpu(), dim=-1).T).argmax(dim=1)


def _throughput(model: LoadedModel, module: torch.nn.Module, batch: torch.Tensor, repeats: int = 3) -> float:
    _outputs(model, module, [batch])  # warm-up (and the speed-mode weight cache)
    start = time.perf_counter()
    for _ in range(repeats):
        _outputs(model, module, [batch])
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def quantize_targets(model: LoadedModel, targets: list, calib_batches: list[torch.Tensor], texts: list[str],
                     options: QuantizeOptions) -> tuple[list, dict[str, torch.Tensor]]:
    """Quantize every target: block by block inside chains (bounded memory, AWQ measured on block
    outputs), one pass for the rest. Returns (layers, parameter overrides of folded LayerNorms)."""
    chains, loose = find_chains(model, targets)
    layers, overrides = [], {}
    for chain in chains:
        chain_targets = [t for t in targets if t.name.startswith(chain.container + ".")]
        if chain.tower == "text" and not texts:
            loose += chain_targets  # no calibration texts: rounded to nearest below
            continue
        if chain.tower == "text":
            chunks = [texts[i:i + 64] for i in range(0, len(texts), 64)]
            drive = lambda: (lambda chunk=chunk: model.encode_text(model.tokenize(chunk)) for chunk in chunks)  # noqa: E731
        else:
            drive = lambda: (lambda images=images: run_images(model, images) for images in calib_batches)  # noqa: E731
        inputs = capture_chain_inputs(chain, drive)
        if inputs is None:
            loose += chain_targets
            continue
        chain_layers, chain_overrides = quantize_chain(chain, chain_targets, inputs, options.bits, options.group_size,
                                                       options.method, options.act_order, options.awq_clip)
        layers += chain_layers
        overrides.update(chain_overrides)
    text_names = {t.name for t in targets if model.family == "open_clip" and not t.name.startswith("visual.")}
    calibrated = [t for t in loose if t.name not in text_names or texts]
    stats = calibrate(model, calibrated, calib_batches, texts) if calibrated else {}
    for target in loose:
        # Without calibration texts the text tower's layers are rounded to nearest.
        method = options.method if target.name in stats else "rtn"
        layers.append(quantize_layer(target, options.bits, options.group_size, method, stats.get(target.name),
                                     options.act_order, options.awq_clip))
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(layers, key=lambda layer: order[layer.target.name]), overrides


def apply_overrides(module: torch.nn.Module, overrides: dict[str, torch.Tensor]) -> None:
    """Copy folded LayerNorm parameters into ``module``."""
    with torch.no_grad():
        for name, value in overrides.items():
            module.get_parameter(name).copy_(value)


def run_quantize(model: LoadedModel, calib: Sequence[ImageItem], held_out: Sequence[ImageItem], output: str,
                 options: QuantizeOptions, config: RunConfig) -> dict:
    """Quantize ``model`` and write ``output``; returns the report (end-to-end figures and layers)."""
    targets, kept = quantization_targets(model, options.towers, options.skip)
    if not targets:
        raise UsageError(f"nothing to quantize in {model.spec} (towers={options.towers}, skip={options.skip})")
    text_targets = [t for t in targets if not t.name.startswith("visual.")] if model.family == "open_clip" else []
    texts = options.texts if text_targets else []
    calib_batches = _batches(calib, model, config, "calibration")
    eval_batches = _batches(held_out, model, config, "held-out")
    layers, overrides = quantize_targets(model, targets, calib_batches, texts, options)
    quantized_module = copy.deepcopy(model.module)
    apply_overrides(quantized_module, overrides)
    install(quantized_module, {layer.target.name: (layer.target.kind,
                                                   QuantizedWeightStore(layer.weight, layer.column_scale))
                               for layer in layers})
    quantized_module.to(model.device)
    before = _outputs(model, model.module, eval_batches)
    after = _outputs(model, quantized_module, eval_batches)
    cosine = F.cosine_similarity(before, after, dim=1)
    report = {
        "method": options.method, "bits": options.bits,
        "group_size": options.group_size or "channel", "towers": options.towers,
        "quantized_layers": len(layers), "kept_layers": len(kept),
        "eval_images": int(before.shape[0]),
        "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        "output_mse": float(((before - after) ** 2).mean()),
    }
    if model.family != "open_clip":
        report["top1_agreement"] = float((before.argmax(1) == after.argmax(1)).float().mean())
    elif options.labels:
        report["label_agreement"] = float((_zero_shot(model, model.module, options.labels, before)
                                           == _zero_shot(model, quantized_module, options.labels, after))
                                          .float().mean())
    report["bytes_before"] = int(sum(t.numel() * t.element_size() for t in model.module.state_dict().values()))
    calibration = {"images": len(calib), "texts": len(texts)}
    file_config = {"method": options.method, "act_order": options.act_order, "awq_clip": options.awq_clip,
                   "bits": options.bits, "group_size": options.group_size, "towers": options.towers,
                   "skip": options.skip, "calibration": calibration,
                   "kept": [f"{name}: {why}" for name, why in kept]}
    report["bytes_after"] = save_quantized(output, model, layers, file_config, overrides)
    if eval_batches:
        report["images_per_s_before"] = _throughput(model, model.module, eval_batches[0])
        report["images_per_s_after"] = _throughput(model, quantized_module, eval_batches[0])
    report["layers"] = [
        {"layer": layer.target.name, "kind": layer.target.kind, "shape": list(layer.weight.shape),
         "alpha": layer.alpha, "scales_folded_into": layer.folded_into,
         "weight_error": layer.weight_error, "output_error": layer.output_error}
        for layer in layers
    ]
    report["kept"] = [{"layer": name, "reason": why} for name, why in kept]
    return report


def write_report(path: str, report: dict) -> None:
    """Per-layer Parquet report with the end-to-end figures in its metadata."""

    rows = report["layers"] + [{"layer": k["layer"], "kind": "kept: " + k["reason"], "shape": None, "alpha": None,
                                "scales_folded_into": None, "weight_error": None, "output_error": None}
                               for k in report["kept"]]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        pa.field("layer", pa.string()), pa.field("kind", pa.string()), pa.field("shape", pa.list_(pa.int64())),
        pa.field("alpha", pa.float64()), pa.field("scales_folded_into", pa.string()),
        pa.field("weight_error", pa.float64()),
        pa.field("output_error", pa.float64())]))
    summary = {k: v for k, v in report.items() if k not in ("layers", "kept")}
    write_parquet(path, table, summary)
