"""The saliency task: targets, the explained score, per-image figures, maps to files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from visbatch.core.errors import UsageError
from visbatch.core.images import Record, crop_box
from visbatch.core.models import LoadedModel, find_spatial_layer
from visbatch.core.pipeline import MapOutput
from visbatch.core.tasks.saliency.attention import attention_modules
from visbatch.core.tasks.saliency.methods import (
    METHODS,
    LayerAccess,
    call_method,
    integration_points,
    item_seed,
    target_scores,
)
from visbatch.core.tasks.saliency.metrics import (
    compact_maps,
    concentration,
    curve_auc,
    deletion_insertion_curves,
    peaks,
)
from visbatch.core.texts import (
    DEFAULT_TEMPLATE,
    TextEncoder,
    TextTable,
    caption_for,
    ensemble_text_embeddings,
    fill_template,
    read_sidecar_caption,
)


@dataclass
class SaliencyOptions:
    method: str = "gradcam"
    params: dict = field(default_factory=dict)  # method parameters (steps, samples, sigma, ...)
    smooth: int = 0  # >0: SmoothGrad over the method with this many samples
    smooth_sigma: float = 0.15
    layer: str | None = None
    target: str | None = None  # top1 | INDEX | CLASS_NAME | predicted | LABEL
    prompt: str | None = None
    captions: TextTable | None = None
    sidecar: bool = False
    labels: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    score: str = "cosine"  # CLIP: cosine | logit
    map_size: int = 32
    evaluate: bool = False
    eval_steps: int = 16
    eval_deletion: str = "blur"  # what deleted pixels become: blur (default) or black (Petsiuk's original)
    save_maps: str | None = None
    internal_batch_size: int = 64
    seed: int = 0


def resolve_class_target(target: str, class_names: list[str] | None) -> int | None:
    """``top1`` -> None (predicted); an index; or a class name (any comma-separated synonym, any case)."""
    if target in ("top1", "predicted"):
        return None
    if target.lstrip("-").isdigit():
        index = int(target)
        count = len(class_names or [])
        if not 0 <= index < count:
            raise UsageError(f"--target {index}: the model has {count} classes")
        return index
    wanted = target.strip().lower()
    for index, name in enumerate(class_names or []):
        if wanted == name.lower() or wanted in (s.strip().lower() for s in name.split(",")):
            return index
    import difflib

    close = difflib.get_close_matches(target, class_names or [], n=3, cutoff=0.6)
    raise UsageError(
        f"--target {target!r} is not a class of the model" + (f"; closest: {', '.join(close)}" if close else "")
    )


MAX_MAP_SIZE = 512  # the compact map is map_size^2 floats per row (1 MB at 512)
BASELINES = ("black", "blur", "noise", "zero")
DELETION_FILLS = ("blur", "black")


def _check_options(options: SaliencyOptions) -> None:
    """Every option value, checked before the run creates anything."""
    if not 1 <= options.map_size <= MAX_MAP_SIZE:
        raise UsageError(f"--map-size {options.map_size}: must be between 1 and {MAX_MAP_SIZE}")
    if options.eval_deletion not in DELETION_FILLS:
        raise UsageError(f"--eval-deletion {options.eval_deletion!r}: choose blur or black")
    if not 2 <= options.eval_steps <= 1000:
        raise UsageError(f"--eval-steps {options.eval_steps}: must be between 2 and 1000")
    params = options.params
    if "rule" in params:
        integration_points(int(params.get("steps", 32)), params["rule"])
    if params.get("baseline", "black") not in BASELINES:
        raise UsageError(f"--baseline {params['baseline']!r}: choose from {', '.join(BASELINES)}")
    if options.smooth_sigma < 0 or not math.isfinite(options.smooth_sigma):
        raise UsageError("--sigma must be a finite number >= 0")


class SaliencyTask:
    """Per batch: targets, attribution maps, figures, overlays and map files."""

    name = "saliency"

    def __init__(self, model: LoadedModel, options: SaliencyOptions):
        if options.method not in METHODS:
            raise UsageError(f"unknown method {options.method!r}; see --list-methods")
        _check_options(options)
        self.model, self.config = model, options
        self.spec = METHODS[options.method]
        if options.smooth and not self.spec.gradient_based:
            raise UsageError(
                f"--smooth wraps gradient methods (gradient, input-x-gradient, integrated-gradients), "
                f"not {options.method}"
            )
        # Scored against texts (CLIP) rather than class logits.
        self.is_clip = "text_embedding" in model.capabilities
        self._setup_targets()
        device = model.device
        mean = torch.tensor(model.preprocess.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(model.preprocess.std, device=device).view(1, 3, 1, 1)
        self.black = ((0 - mean) / std).to(model.dtype)
        self.pixel_range = (float(((0 - mean) / std).min()), float(((1 - mean) / std).max()))
        tower = model.adapter.image_tower(model.module)
        self.method_params = dict(options.params)
        self.method_params["internal_batch_size"] = options.internal_batch_size
        if "layer" in self.spec.needs:
            spatial = find_spatial_layer(model, options.layer)
            self.method_params["layer"] = LayerAccess(dict(tower.named_modules())[spatial.name], spatial)
            self.layer_name = spatial.name
        else:
            self.layer_name = None
        if "attention" in self.spec.needs:
            modules = attention_modules(tower)
            spatial = find_spatial_layer(model)
            if not modules or spatial.kind != "tokens":
                raise UsageError(f"attention-relevance needs a ViT; {model.spec} has no attention blocks")
            self.method_params.update(attention=modules, spatial=spatial)
        self._run_params = self.spec.setup(self) if self.spec.setup else {}
        self._gaps: list[float] = []
        self._deletion: list[float] = []
        self._insertion: list[float] = []

    # -- targets and the explained score ---------------------------------------------------------

    def _setup_targets(self) -> None:
        o, model = self.config, self.model
        self.text_encoder = None
        self.annotate = None
        if not self.is_clip:
            model.require("class_logits")
            if o.prompt is not None or o.captions is not None or o.sidecar or o.labels:
                raise UsageError(f"{model.spec} is a classifier: use --target top1|INDEX|CLASS_NAME, not texts")
            self.fixed_target = resolve_class_target(o.target or "top1", model.class_names)
            return
        sources = sum([o.prompt is not None, o.captions is not None, o.sidecar, bool(o.labels)])
        if sources != 1:
            raise UsageError(
                "a CLIP model needs exactly one of --prompt, --labels/--labels-file, --captions, --sidecar"
            )
        if o.score not in ("cosine", "logit"):
            raise UsageError("--score must be cosine or logit")
        self.text_encoder = TextEncoder(model)
        logit_scale = getattr(model.module, "logit_scale", None)
        self.logit_scale = float(logit_scale.exp()) if isinstance(logit_scale, torch.Tensor) else 100.0
        self.fixed_target = None
        if o.prompt is not None:
            self.texts: torch.Tensor | None = F.normalize(self.text_encoder.encode([o.prompt]), dim=-1)
            self.fixed_target = 0
        elif o.labels:
            embeddings = self.text_encoder.encode([fill_template(t, label) for label in o.labels for t in o.templates])
            self.texts = ensemble_text_embeddings(embeddings.view(len(o.labels), len(o.templates), -1))
            self.fixed_target = resolve_class_target(o.target or "predicted", o.labels)
        else:
            self.texts = None  # per-image captions, encoded per batch
            self.annotate = read_sidecar_caption if o.sidecar else None

    def _cosines(self, x: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.model.module.encode_image(x).float(), dim=-1)
        return image @ texts.T

    def _forward_for(self, texts: torch.Tensor | None):
        """forward(x) -> [N, K]: logits for classifiers, image-text cosines (or logits) for CLIP."""
        if not self.is_clip:
            return lambda x: self.model.module(x).float()
        assert texts is not None  # CLIP: the prompt/label embeddings or the batch's caption embeddings
        scale = self.logit_scale if self.config.score == "logit" else 1.0
        return lambda x: scale * self._cosines(x, texts)

    def _eval_score_fn(self, texts):
        """The curve of deletion/insertion: a probability where there are classes, else the cosine."""
        if not self.is_clip:
            return lambda x, t: target_scores(self.model.module(x).float().softmax(dim=-1), t)
        if self.config.labels:
            return lambda x, t: target_scores((self.logit_scale * self._cosines(x, texts)).softmax(dim=-1), t)
        return lambda x, t: target_scores(self._cosines(x, texts), t)

    # -- Task interface ---------------------------------------------------------------------------

    def fields(self) -> list[pa.Field]:
        fields = [
            pa.field("method", pa.string()),
            pa.field("target", pa.string()),
            pa.field("target_index", pa.int32()),
            pa.field("target_score", pa.float32()),
            pa.field("peak_x", pa.float32()),
            pa.field("peak_y", pa.float32()),
            pa.field("concentration", pa.float32()),
            pa.field("completeness_gap", pa.float32()),
            pa.field("map", pa.list_(pa.float32(), self.config.map_size**2)),
        ]
        if self.config.evaluate:
            points = pa.list_(pa.float32(), self.config.eval_steps + 1)  # the score at 0, 1/steps, ... 1 of the pixels
            fields += [
                pa.field("deletion_auc", pa.float32()),
                pa.field("insertion_auc", pa.float32()),
                pa.field("deletion_curve", points),
                pa.field("insertion_curve", points),
            ]
        return fields

    def options(self) -> dict:
        o = self.config
        # internal_batch_size only chunks the work (it follows --batch-size): not a result option.
        params = {
            k: v
            for k, v in self.method_params.items()
            if isinstance(v, (int, float, str, bool)) and k != "internal_batch_size"
        }
        return {
            "method": o.method,
            "params": params,
            "smooth": o.smooth,
            "smooth_sigma": o.smooth_sigma,
            "layer": self.layer_name,
            "target": o.target,
            "prompt": o.prompt,
            "labels": o.labels,
            "templates": o.templates if o.labels else None,
            "score": o.score,
            "map_size": o.map_size,
            "eval": o.evaluate,
            "eval_steps": o.eval_steps,
            "seed": o.seed,
            "eval_deletion": o.eval_deletion,
            "eval_baseline": f"deletion: pixels become {o.eval_deletion}; insertion: from a blur with sigma = "
            "1/10 of the shorter side; curve: probability (classes) or cosine (texts)",
        }

    def _per_image_noise(self, records: Sequence[Record], images: torch.Tensor, samples: int, sigma: float):
        stdev = sigma * (self.pixel_range[1] - self.pixel_range[0])
        noise = []
        for record in records:
            generator = torch.Generator(device="cpu").manual_seed(item_seed(self.config.seed, record.item.relpath))
            noise.append(torch.normal(0.0, torch.full((samples, *images.shape[1:]), stdev), generator=generator))
        return torch.cat(noise)

    def _attribute(self, forward, images, targets, records):
        o = self.config
        params = dict(self.method_params)
        params.update(black=self.black, pixel_range=self.pixel_range)
        params.update(self._run_params)
        if self.spec.per_batch:
            params.update(self.spec.per_batch(self, images, records, params))
        if o.method == "smoothgrad" or o.smooth:
            samples = o.smooth or params.pop("samples", 16)
            sigma = o.smooth_sigma if o.smooth else params.pop("sigma", 0.15)
            base = o.method if o.smooth else params.pop("base", "gradient")
            noise = self._per_image_noise(records, images, samples, sigma)
            return METHODS["smoothgrad"].function(
                forward, images, targets, samples=samples, sigma=sigma, base=base, noise=noise, **params
            )
        return call_method(self.spec, forward, images, targets, params)

    def map(self, images: torch.Tensor, records: Sequence[Record]) -> MapOutput:
        o = self.config
        rows: list[dict] = [{} for _ in records]
        overlays: list[np.ndarray | None] = [None] * len(records)
        keep = list(range(len(records)))
        texts = self.texts if self.is_clip else None
        target_names: list[str] | None = None
        if self.is_clip and self.texts is None:
            captions = [caption_for(r, None, self.config.captions) for r in records]
            for i, (_, error) in enumerate(captions):
                if error:
                    rows[i].update(status="error", error=error)
            keep = [i for i, (text, _) in enumerate(captions) if text is not None]
            if not keep:
                return MapOutput(rows, overlays)
            caption_texts = [captions[i][0] for i in keep]
            texts = F.normalize(self.text_encoder.encode(caption_texts), dim=-1)
            target_names = caption_texts
        x = self.model.to_input(images[keep])
        kept_records = [records[i] for i in keep]
        forward = self._forward_for(texts)
        if self.is_clip and self.texts is None:
            targets = torch.arange(len(keep), device=x.device)
        elif self.fixed_target is not None:
            targets = torch.full((len(keep),), self.fixed_target, device=x.device, dtype=torch.long)
        else:
            targets = None  # the top output
        if targets is None and self.spec.picks_targets and not o.smooth:
            result = self._attribute(forward, x, None, kept_records)
            targets, explained = result.extras["targets"], result.extras["scores"]
        else:
            with torch.no_grad():
                outputs = forward(x)
            targets = outputs.argmax(dim=1) if targets is None else targets
            explained = target_scores(outputs, targets)
            result = self._attribute(forward, x, targets, kept_records)
        maps = result.maps.detach().float()
        peak_x, peak_y = peaks(maps)
        focus = concentration(maps)
        empty_maps = (maps.flatten(1).abs().amax(dim=1) == 0).cpu()
        compact = compact_maps(maps, o.map_size).reshape(len(keep), -1)
        deletion = insertion = None
        if o.evaluate:
            deletion_curve, insertion_curve = deletion_insertion_curves(
                self._eval_score_fn(texts),
                x,
                targets,
                maps,
                o.eval_steps,
                self.black,
                o.internal_batch_size,
                o.eval_deletion,
            )
            deletion, insertion = curve_auc(deletion_curve), curve_auc(insertion_curve)
            deletion_points, insertion_points = deletion_curve.cpu().numpy(), insertion_curve.cpu().numpy()
        gap = result.extras.get("completeness_gap")
        names = self._target_names(targets, target_names)
        maps_np = maps.cpu().numpy()
        for n, i in enumerate(keep):
            record = records[i]
            x0, y0, x1, y1 = crop_box(record.width, record.height, self.model.preprocess.geometry)
            # An all-zero map (IG of an image equal to its baseline) is a true answer with no
            # peak and no concentration: those are null, not NaN.
            empty = bool(empty_maps[n])
            row = {
                "method": o.method if not o.smooth else f"smooth-{o.method}",
                "target": names[n],
                "target_index": int(targets[n]),
                "target_score": float(explained[n]),
                "peak_x": None if empty else float(np.clip(x0 + (x1 - x0) * float(peak_x[n]), 0, 1)),
                "peak_y": None if empty else float(np.clip(y0 + (y1 - y0) * float(peak_y[n]), 0, 1)),
                "concentration": None if empty else float(focus[n]),
                "completeness_gap": float(gap[n]) if gap is not None else None,
                "map": compact[n].cpu().numpy(),
            }
            if deletion is not None:
                row.update(
                    deletion_auc=float(deletion[n]),
                    insertion_auc=float(insertion[n]),
                    deletion_curve=deletion_points[n],
                    insertion_curve=insertion_points[n],
                )
            rows[i].update(row)
            overlays[i] = maps_np[n]
        return MapOutput(rows, overlays, arrays=overlays if o.save_maps else None)

    def _target_names(self, targets: torch.Tensor, caption_texts: list[str] | None) -> list[str]:
        if caption_texts is not None:
            return caption_texts
        if self.is_clip and self.config.prompt is not None:
            return [self.config.prompt] * len(targets)
        names = self.config.labels if self.is_clip else self.model.class_names
        return [names[int(t)] if names else str(int(t)) for t in targets]

    summary_columns = ("completeness_gap", "deletion_auc", "insertion_auc")

    def observe(self, rows: list[dict]) -> None:
        for row in rows:
            if row.get("completeness_gap") is not None:
                self._gaps.append(abs(row["completeness_gap"]))
            if row.get("deletion_auc") is not None:
                self._deletion.append(row["deletion_auc"])
                self._insertion.append(row["insertion_auc"])

    def summary(self) -> dict:
        out: dict[str, Any] = (
            {"method": self.config.method, "layer": self.layer_name}
            if self.layer_name
            else {"method": self.config.method}
        )
        if self._gaps:
            out["completeness_gap_mean_abs"] = float(np.mean(self._gaps))
        if self._deletion:
            out.update(
                deletion_auc_mean=float(np.mean(self._deletion)), insertion_auc_mean=float(np.mean(self._insertion))
            )
        return out
