"""detect-aigi: labelled inputs, the feature task, training, the detector file, scoring and evaluation."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from visbatch.core.errors import UsageError
from visbatch.core.files import atomic_path
from visbatch.core.images import Geometry, ImageItem, InputError, SourceOptions, find_images
from visbatch.core.models import LoadedModel, ModelError
from visbatch.core.pipeline import MapOutput
from visbatch.core.tasks.aigi.classifier import LogisticModel
from visbatch.core.tasks.aigi.features import (
    BITPLANE_NAMES,
    NPR_NAMES,
    SPECTRUM_NAMES,
    bitplane_features,
    npr_features,
    spectrum_features,
)
from visbatch.core.tasks.aigi.fusion import FusedClassifier, GroupModel

FEATURE_GROUPS = ("embedding", "layers", "npr", "bitplane", "spectrum")
BACKBONE_GROUPS = ("embedding", "layers")  # groups that run the --model backbone
ARTEFACT_GROUPS = ("npr", "bitplane", "spectrum")
POLICIES = ("crop", "resize", "tiles")
DETECTOR_FORMAT = "visbatch-aigi-detector"
DETECTOR_VERSION = 2  # 2: per-group regressions fused by a stacked one; 1 (one regression) still loads


# ----------------------------------------------------------------------------
# Labelled inputs
# ----------------------------------------------------------------------------


@dataclass
class LabelledItems:
    items: list[ImageItem]
    labels: list[int]  # 1 = fake
    generators: list[str]


def read_labelled_root(root: str) -> LabelledItems:
    """ForenSynths/UnivFD layout: ``ROOT/0_real``, ``ROOT/1_fake``, or ``ROOT/<generator>/0_real|1_fake``
    (also one level deeper: ``ROOT/<generator>/<class>/0_real``)."""
    if not os.path.isdir(root):
        raise InputError(f"input not found: {root}")
    out = LabelledItems([], [], [])
    for item in find_images([root], SourceOptions()):
        parts = item.relpath.split("/")
        label_dirs = [i for i, p in enumerate(parts[:-1]) if p in ("0_real", "1_fake")]
        if not label_dirs:
            continue
        at = label_dirs[-1]
        out.items.append(item)
        out.labels.append(1 if parts[at] == "1_fake" else 0)
        out.generators.append(parts[0] if at > 0 else "default")
    if not out.items:
        raise InputError(f"{root}: no images under 0_real/ or 1_fake/ folders")
    return out


def read_labelled_folders(real: Sequence[str], fake: Sequence[str]) -> LabelledItems:
    out = LabelledItems([], [], [])
    for label, folders in ((0, real), (1, fake)):
        for folder in folders:
            found = find_images([folder], SourceOptions())
            if not found:
                raise InputError(f"no images in {folder}")
            out.items += found
            out.labels += [label] * len(found)
            out.generators += ["default"] * len(found)
    return out


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------


def jpeg_round_trip(pixels: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Re-encode uint8 [B, 3, H, W] images as JPEG and decode them again (on CPU)."""
    out = []
    for image in pixels.cpu():
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out).to(pixels.device)


@dataclass
class Tiling:
    """``--policy tiles``: the centre (k * size) square at native resolution, cut into k x k tiles
    of the detector's size. An image's features are the mean over the tiles that lie inside it
    (at least half of their area; the best-covered one for an image smaller than a tile): the
    classifier is linear, so that is the mean of the tiles' logits, evidence from every tile."""

    size: int
    per_side: int

    def split(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, k*size, k*size] -> [B * k * k, 3, size, size], tiles in row-major order."""
        b, c = images.shape[:2]
        k, n = self.per_side, self.size
        tiles = images[:, :, : k * n, : k * n].unfold(2, n, n).unfold(3, n, n)  # [B, C, k, k, n, n]
        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(b * k * k, c, n, n).contiguous()

    def inside(self, records) -> torch.Tensor:
        """[B, k*k] bool: the tiles that show the image rather than the padding around it."""
        k, n = self.per_side, self.size
        side = k * n
        masks = []
        for record in records:
            h, w = min(record.height or side, side), min(record.width or side, side)
            top, left = (side - h) // 2, (side - w) // 2
            edges = torch.arange(k) * n
            rows = ((torch.minimum(edges + n, torch.tensor(top + h)) - torch.maximum(edges, torch.tensor(top)))
                    .clamp(min=0) / n)
            cols = ((torch.minimum(edges + n, torch.tensor(left + w)) - torch.maximum(edges, torch.tensor(left)))
                    .clamp(min=0) / n)
            cover = (rows.view(-1, 1) * cols.view(1, -1)).flatten()
            mask = cover >= 0.5
            if not mask.any():
                mask = cover == cover.max()
            masks.append(mask)
        return torch.stack(masks)

    @staticmethod
    def mean_inside(per_tile: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """[B, D]: the mean of ``per_tile`` [B, k*k, D] over the tiles marked in ``inside`` [B, k*k]."""
        weights = inside.to(per_tile.device).float().unsqueeze(-1)
        return (per_tile * weights).sum(dim=1) / weights.sum(dim=1)


@dataclass
class FeatureExtractor:
    """Feature vector of uint8 crops: the chosen groups, concatenated, with their names."""

    model: LoadedModel | None
    groups: tuple[str, ...]
    raw_embedding: bool = False  # UnivFD's head reads unnormalized embeddings
    tiling: Tiling | None = None  # --policy tiles
    _widths: dict | None = field(default=None, repr=False)  # columns per group, known after a call

    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, k*k, D]: the features of each tile (``tiling`` set)."""
        tiles = self.tiling.split(pixels)
        return self(tiles).view(pixels.shape[0], self.tiling.per_side ** 2, -1)

    def image_features(self, pixels: torch.Tensor, records) -> torch.Tensor:
        """[B, D]: the features of each image under the policy (the tiles' mean for ``tiles``)."""
        if self.tiling is None:
            return self(pixels)
        return self.tiling.mean_inside(self.tile_features(pixels), self.tiling.inside(records))

    def names(self) -> list[str]:
        """Feature names in column order (the backbone groups' widths come from one tiny probe)."""
        if self._widths is None:
            self(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        fixed = {"npr": NPR_NAMES, "bitplane": BITPLANE_NAMES, "spectrum": SPECTRUM_NAMES}
        prefix = {"embedding": "emb", "layers": "layers"}
        names: list[str] = []
        for group in self.groups:
            names += fixed[group] if group in fixed else [f"{prefix[group]}_{i}" for i in range(self._widths[group])]
        return names

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        parts = []
        x = pixels.float() / 255
        for group in self.groups:
            if group == "npr":
                parts.append(npr_features(x))
            elif group == "bitplane":
                parts.append(bitplane_features(pixels))
            elif group == "spectrum":
                parts.append(spectrum_features(x))
            elif group == "embedding":
                embedding = self.model.encode_image(self._model_input(pixels)).float()
                parts.append(embedding if self.raw_embedding else F.normalize(embedding, dim=-1))
            elif group == "layers":
                parts.append(self.model.encode_layers(self._model_input(pixels)).float())
            else:
                raise UsageError(f"unknown feature group {group!r} (choose from {', '.join(FEATURE_GROUPS)})")
        self._widths = {group: part.shape[1] for group, part in zip(self.groups, parts)}
        return torch.cat([p.float().to(pixels.device) for p in parts], dim=1)

    def _model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.model.preprocess.geometry.crop
        resized = F.interpolate(pixels.float(), size=size, mode="bilinear", antialias=True,
                                align_corners=False).round().clamp(0, 255).to(torch.uint8)
        return self.model.to_input(resized)

    @property
    def has_patch_embeddings(self) -> bool:
        return "embedding" in self.groups and self.model is not None and self.model.has_patch_tokens

    @torch.inference_mode()
    def patch_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, grid_h, grid_w, D]: each ViT patch token's embedding, normalized as the image
        embedding is (see :meth:`LoadedModel.encode_patches`)."""
        patches = self.model.encode_patches(self._model_input(pixels)).float()
        return patches if self.raw_embedding else F.normalize(patches, dim=-1)


def policy_geometry(policy: str, size: int, tiles: int = 1) -> Geometry:
    """``crop``: centre crop at native resolution (padding small images); ``resize``: shortest side to
    ``size`` then centre crop (destroys up-sampling traces: warned about for artefact groups);
    ``tiles``: centre crop of ``tiles`` x ``tiles`` tiles of ``size`` at native resolution."""
    if policy == "crop":
        return Geometry(resize=0, crop=(size, size), resize_mode="none")
    if policy == "tiles":
        return Geometry(resize=0, crop=(tiles * size, tiles * size), resize_mode="none")
    if policy == "resize":
        return Geometry(resize=size, crop=(size, size), interpolation="bilinear")
    raise UsageError(f"unknown policy {policy!r} (crop, resize or tiles)")


class FeatureTask:
    """Map stage shared by train and eval: one feature vector per image."""

    name = "detect-aigi-features"

    def __init__(self, extractor: FeatureExtractor, geometry: Geometry, normalize_format: bool = False):
        self.extractor, self.geometry, self.normalize_format = extractor, geometry, normalize_format

    def fields(self):
        return [pa.field("features", pa.list_(pa.float32()))]

    def options(self):
        return {"groups": list(self.extractor.groups), "geometry": self.geometry.as_dict(),
                "normalize_format": self.normalize_format}

    def map(self, images, records):
        if self.normalize_format:
            images = jpeg_round_trip(images)
        return MapOutput([{"features": f.cpu().numpy()} for f in self.extractor.image_features(images, records)])

    def summary(self):
        return {}


# ----------------------------------------------------------------------------
# The detector file
# ----------------------------------------------------------------------------


@dataclass
class Detector:
    classifier: LogisticModel | FusedClassifier  # one regression (format 1, UnivFD's head) or fused groups
    groups: tuple[str, ...]
    feature_names: list[str]
    platt: tuple[float, float]
    threshold: float
    policy: str
    size: int
    backbone: dict | None
    training: dict = field(default_factory=dict)
    raw_embedding: bool = False
    tiles: int = 1  # tiles per side with policy "tiles"

    def tiling(self) -> Tiling | None:
        return Tiling(self.size, self.tiles) if self.policy == "tiles" else None

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(features.cpu())

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        a, b = self.platt
        return torch.sigmoid(a * self.logits(features) + b)

    def group_scores(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each group's share of the logit (calibration slope applied)."""
        if isinstance(self.classifier, FusedClassifier):
            return {g: v * self.platt[0] for g, v in self.classifier.group_contributions(features).items()}
        contributions = self.classifier.contributions(features.cpu()) * self.platt[0]
        out, start = {}, 0
        for group in self.groups:
            width = sum(1 for n in self.feature_names if _group_of(n) == group)
            out[group] = contributions[:, start:start + width].sum(dim=1)
            start += width
        return out

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        def linear(prefix: str, model: LogisticModel) -> dict[str, torch.Tensor]:
            return {f"{prefix}mean": model.mean.cpu(), f"{prefix}std": model.std.cpu(),
                    f"{prefix}weight": model.weight.cpu(), f"{prefix}bias": model.bias.cpu().reshape(1)}

        if isinstance(self.classifier, FusedClassifier):
            tensors = linear("fusion.", self.classifier.fusion)
            for member in self.classifier.members:
                tensors.update(linear(f"group.{member.group}.", member.model))
            classifier = {"kind": "fused", "members": [{"group": m.group, "l2": m.l2}
                                                       for m in self.classifier.members]}
        else:
            tensors, classifier = linear("", self.classifier), {"kind": "linear"}
        metadata = {"format": DETECTOR_FORMAT, "format_version": str(DETECTOR_VERSION), "config": json.dumps({
            "groups": list(self.groups), "feature_names": self.feature_names, "platt": list(self.platt),
            "threshold": self.threshold, "policy": self.policy, "size": self.size, "backbone": self.backbone,
            "training": self.training, "raw_embedding": self.raw_embedding, "tiles": self.tiles,
            "classifier": classifier})}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str) -> Detector:
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise ModelError(f"detector not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ModelError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}")
        if metadata.get("format") != DETECTOR_FORMAT:
            raise ModelError(f"{path} is not a visbatch detector (train one with `visbatch detect-aigi train`)")
        if metadata.get("format_version") not in ("1", str(DETECTOR_VERSION)):
            raise ModelError(f"{path}: detector format version {metadata.get('format_version')} is not supported "
                             f"(this visbatch reads 1 and {DETECTOR_VERSION})")
        try:
            config = json.loads(metadata["config"])
            classifier = _load_classifier(tensors, config)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: damaged detector file ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return cls(classifier, tuple(config["groups"]), config["feature_names"], tuple(config["platt"]),
                   config["threshold"], config["policy"], config["size"], config["backbone"], config["training"],
                   config.get("raw_embedding", False), int(config.get("tiles", 1)))

    def check_backbone(self, model: LoadedModel | None) -> None:
        """Refuse a backbone other than the one the detector was trained with."""
        if self.backbone is None:
            return
        if model is None or model.checksum != self.backbone.get("checksum"):
            got = "none" if model is None else f"{model.spec} ({model.checksum[:19]}...)"
            raise ModelError(f"the detector was trained on backbone {self.backbone.get('spec')} "
                             f"({str(self.backbone.get('checksum'))[:19]}...), not {got}; pass the same --model")


def _load_classifier(tensors: dict[str, torch.Tensor], config: dict) -> LogisticModel | FusedClassifier:
    """The classifier a detector file holds, its shapes checked against the feature names."""
    def linear(prefix: str, width: int) -> LogisticModel:
        model = LogisticModel(tensors[f"{prefix}mean"].float(), tensors[f"{prefix}std"].float(),
                              tensors[f"{prefix}weight"].float(), tensors[f"{prefix}bias"].float().reshape(()))
        for name in ("mean", "std", "weight"):
            if tuple(getattr(model, name).shape) != (width,):
                raise ValueError(f"{prefix}{name} has shape {tuple(getattr(model, name).shape)}, expected ({width},)")
            if not bool(torch.isfinite(getattr(model, name)).all()):
                raise ValueError(f"{prefix}{name} is not finite")
        return model

    names = config["feature_names"]
    spec = config.get("classifier", {"kind": "linear"})
    if spec["kind"] == "linear":
        return linear("", len(names))
    members = []
    for entry in spec["members"]:
        columns = torch.tensor([i for i, n in enumerate(names) if _group_of(n) == entry["group"]], dtype=torch.long)
        members.append(GroupModel(entry["group"], columns, linear(f"group.{entry['group']}.", len(columns)),
                                  float(entry["l2"])))
    return FusedClassifier(members, linear("fusion.", len(members)))


def group_columns(feature_names: Sequence[str], groups: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each group's column indices in a feature vector with these names."""
    return {g: torch.tensor([i for i, n in enumerate(feature_names) if _group_of(n) == g], dtype=torch.long)
            for g in groups}


def _group_of(name: str) -> str:
    if name.startswith("emb_"):
        return "embedding"
    if name.startswith("layers_"):
        return "layers"
    if name.startswith("npr_"):
        return "npr"
    if name.startswith("bit"):
        return "bitplane"
    return "spectrum"


def univfd_detector(path: str, backbone: LoadedModel) -> Detector:
    """UnivFD's released linear head (a state dict with ``weight`` [1, D] and ``bias`` [1]) on raw
    image embeddings (Ojha et al., CVPR 2023), as a visbatch detector (no calibration: Platt (1, 0))."""
    from visbatch.core.models import load_state_dict_file

    state = load_state_dict_file(path)
    state = {k.split(".")[-1]: v for k, v in state.items()}
    if "weight" not in state or "bias" not in state:
        raise ModelError(f"{path}: expected a linear head with 'weight' and 'bias'")
    weight, bias = state["weight"].float(), state["bias"].float()
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise ModelError(f"{path}: head weight has shape {tuple(weight.shape)}, expected [1, D]")
    dim = weight.shape[1]
    with torch.inference_mode():
        probe = torch.zeros(1, 3, *backbone.preprocess.geometry.crop, dtype=torch.uint8)
        backbone_dim = backbone.encode_image(backbone.to_input(probe)).shape[-1]
    if backbone_dim != dim:
        raise ModelError(f"{path}: head expects {dim}-d features but {backbone.spec} gives {backbone_dim}-d "
                         "(UnivFD's head needs --model ViT-L-14 --pretrained openai)")
    # UnivFD applies its head to the embedding as it comes out of the image tower (not normalized).
    classifier = LogisticModel(torch.zeros(dim), torch.ones(dim), weight[0], bias[0])
    return Detector(classifier, ("embedding",), [f"emb_{i}" for i in range(dim)], (1.0, 0.0), 0.5, "resize",
                    min(backbone.preprocess.geometry.crop), backbone.describe(), {"source": f"UnivFD head {path}"},
                    raw_embedding=True)


# ----------------------------------------------------------------------------
# Training, scoring, evaluation
# ----------------------------------------------------------------------------


def stratified_split(labels: Sequence[int], holdout: float, seed: int, groups: Sequence[str] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices with ``holdout`` of each class held out. With ``groups`` (one name
    per item), whole groups go to one side, so crops or near-copies of one photo never straddle the
    split and the held-out figures (and the calibration fitted on them) are not flattered; at least
    one group of each class stays in training."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, held = [], []
    for value in (0, 1):
        index = rng.permutation(np.flatnonzero(labels == value))
        cut = max(1, int(round(len(index) * holdout))) if len(index) > 1 else 0
        if groups is None:
            held += index[:cut].tolist()
            train += index[cut:].tolist()
            continue
        names = np.asarray(groups, dtype=object)[index]
        order = list(dict.fromkeys(names.tolist()))  # groups in the shuffled order of their first item
        taken: list[int] = []
        for name in order[:-1]:
            if len(taken) >= cut:
                break
            taken += index[names == name].tolist()
        held += taken
        taken_set = set(taken)
        train += [i for i in index.tolist() if i not in taken_set]
    return np.sort(train), np.sort(held)


def train_detector(features: torch.Tensor, data: LabelledItems, groups, feature_names, policy, size, backbone,
                   holdout: float = 0.25, seed: int = 0, l2: float | None = None, tiles: int = 1,
                   split_groups: Sequence[str] | None = None, select: bool = True) -> tuple[Detector, dict]:
    """Per-group regressions fused by a stacked one (:mod:`fusion`), fitted on the training split;
    calibration (Platt) and the threshold on the held-out split (whole ``split_groups`` on one
    side, see :func:`stratified_split`).

    Within the training split, folds choose each group's L2 and the fusion's inputs: one fold per
    generator when the data has generator folders (leave-one-generator-out; with ``select`` it
    also chooses which groups to keep), else stratified folds. ``l2`` fixes every group's L2."""
    from visbatch.core.tasks.aigi.classifier import (
        auroc,
        average_precision,
        choose_threshold,
        expected_calibration_error,
        fit_platt,
    )
    from visbatch.core.tasks.aigi.fusion import chance_groups, fit_fused, generator_folds, stratified_folds

    labels = torch.tensor(data.labels)
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise InputError("training needs both real and fake images")
    train, held = stratified_split(data.labels, holdout, seed, split_groups)
    train_labels = labels[train]
    train_generators = [data.generators[i] for i in train]
    folds = generator_folds(train_labels.tolist(), train_generators)
    if folds is not None:
        fold_kind, fold_names = "generator", sorted(set(train_generators))
    else:
        fold_groups = None if split_groups is None else [split_groups[i] for i in train]
        folds = stratified_folds(train_labels.tolist(), seed=seed, groups=fold_groups)
        fold_kind, fold_names = "stratified", [f"fold {i}" for i in range(int(folds.max()) + 1)]
    columns = group_columns(feature_names, groups)
    fit = fit_fused(features[train], train_labels, columns, folds, fold_kind, fold_names,
                    select=select and fold_kind == "generator" and len(groups) > 1, l2=l2)
    # The detector keeps only the selected groups' columns (scoring computes nothing else).
    kept_names = [n for n in feature_names if _group_of(n) in fit.selected]
    kept_columns = torch.cat([columns[g] for g in fit.selected]).sort().values
    new_columns = group_columns(kept_names, fit.selected)
    for member in fit.classifier.members:
        member.columns = new_columns[member.group]
    classifier = fit.classifier
    held_logits = classifier.logits(features[held][:, kept_columns])
    platt = fit_platt(held_logits, labels[held])
    held_p = torch.sigmoid(platt[0] * held_logits + platt[1])
    threshold = choose_threshold(held_p, labels[held])
    summary = {}
    for generator in sorted(set(data.generators)):
        mask = [g == generator for g in data.generators]
        summary[generator] = {"real": int(sum(1 for m, y in zip(mask, data.labels) if m and y == 0)),
                              "fake": int(sum(1 for m, y in zip(mask, data.labels) if m and y == 1))}
    table = [{"held_out": fold_names[fold], "fused": fit.fused_per_fold_ap.get(fold),
              **{c.group: c.per_fold_ap.get(fold) for c in fit.checks}} for fold in range(len(fold_names))]
    report = {"train": len(train), "held_out": len(held),
              "split_groups": None if split_groups is None else len(set(split_groups)),
              "held_out_ap": average_precision(labels[held], held_p),
              "held_out_auroc": auroc(labels[held], held_p),
              "held_out_ece": expected_calibration_error(held_p, labels[held]),
              "threshold": threshold, "platt": list(platt), "per_generator": summary,
              "requested_groups": list(groups), "selected_groups": fit.selected, "folds": fold_kind,
              "fold_ap": table, "fused_fold_ap_mean": fit.fused_mean_ap,
              "groups": {c.group: {"l2": c.l2, "fold_ap_mean": c.mean_ap, "fold_auroc_mean": c.mean_auroc}
                         for c in fit.checks},
              "fusion_weights": {m.group: float(w) for m, w in zip(classifier.members, classifier.fusion.weight)},
              "groups_at_chance": chance_groups(fit.checks)}
    detector = Detector(classifier, tuple(fit.selected), kept_names, platt, threshold, policy, size,
                        backbone if any(g in BACKBONE_GROUPS for g in fit.selected) else None,
                        training=report, tiles=tiles)
    return detector, report


def evaluate(labels: Sequence[int], generators: Sequence[str], p_fake: torch.Tensor, threshold: float) -> list[dict]:
    """One row per generator plus ``all``: AP, AUROC, accuracy at 0.5 and at the threshold, per-class accuracy."""
    from visbatch.core.tasks.aigi.classifier import auroc, average_precision

    labels_t = torch.tensor(list(labels))
    rows = []
    for generator in sorted(set(generators)) + ["all"]:
        mask = torch.tensor([generator == "all" or g == generator for g in generators])
        y, p = labels_t[mask], p_fake[mask]
        real, fake = y == 0, y == 1
        rows.append({
            "generator": generator, "n_real": int(real.sum()), "n_fake": int(fake.sum()),
            "ap": average_precision(y, p) if fake.any() else float("nan"),
            "auroc": auroc(y, p),
            "acc_at_0_5": float(((p >= 0.5).long() == y).float().mean()),
            "acc_at_threshold": float(((p >= threshold).long() == y).float().mean()),
            "real_acc": float((p[real] < threshold).float().mean()) if real.any() else float("nan"),
            "fake_acc": float((p[fake] >= threshold).float().mean()) if fake.any() else float("nan"),
        })
    return rows


def format_confounds(data: LabelledItems) -> list[str]:
    """Warnings where real and fake differ in file format, size or JPEG quality (the classic confound)."""
    warnings = []
    stats = {0: {"formats": {}, "pixels": [], "quality": []}, 1: {"formats": {}, "pixels": [], "quality": []}}
    for item, label in zip(data.items, data.labels):
        try:
            with Image.open(item.path) as img:
                fmt = img.format or "?"
                stats[label]["formats"][fmt] = stats[label]["formats"].get(fmt, 0) + 1
                stats[label]["pixels"].append(img.size[0] * img.size[1])
                if fmt == "JPEG" and getattr(img, "quantization", None):
                    table = img.quantization.get(0)
                    stats[label]["quality"].append(float(np.mean(table)) if table else np.nan)
        except OSError:
            continue
    real, fake = stats[0], stats[1]
    if set(real["formats"]) != set(fake["formats"]):
        warnings.append(f"real images are {dict(real['formats'])} but fake images are {dict(fake['formats'])}: "
                        "a detector can learn the file format; use --normalize-format")
    if real["pixels"] and fake["pixels"]:
        a, b = np.median(real["pixels"]), np.median(fake["pixels"])
        if max(a, b) > 1.5 * min(a, b):
            warnings.append(f"median image size differs (real {a:.0f} px, fake {b:.0f} px): size can give the answer")
    if real["quality"] and fake["quality"]:
        a, b = np.nanmedian(real["quality"]), np.nanmedian(fake["quality"])
        if abs(a - b) > 0.25 * max(a, b, 1e-9):
            warnings.append(f"JPEG quantization differs (mean luminance table: real {a:.1f}, fake {b:.1f}): "
                            "compression can give the answer; use --normalize-format")
    return warnings


class ScoreTask:
    """``score``: calibrated p_fake, a label, each group's share, optional TTA and patch heatmaps."""

    name = "detect-aigi"

    def __init__(self, detector: Detector, extractor: FeatureExtractor, tta: bool = False, heatmaps: bool = False,
                 heatmap_tiles: int = 4):
        self.detector, self.extractor, self.tta, self.heatmaps = detector, extractor, tta, heatmaps
        self.heatmap_tiles = heatmap_tiles  # crop and resize policies: sub-tiles of the crop
        self.patch_heatmaps = heatmaps and extractor.has_patch_embeddings and extractor.tiling is None
        self.geometry = policy_geometry(detector.policy, detector.size, detector.tiles)
        self._counts = {"real": 0, "fake": 0, "unsure": 0}

    def fields(self):
        fields = [pa.field("p_fake", pa.float32()), pa.field("label", pa.string())]
        fields += [pa.field(f"score_{g}", pa.float32()) for g in self.detector.groups]
        if self.tta:
            fields += [pa.field("p_fake_jpeg", pa.float32()), pa.field("p_fake_resized", pa.float32())]
        return fields

    def options(self):
        return {"threshold": self.detector.threshold, "policy": self.detector.policy, "size": self.detector.size,
                "groups": list(self.detector.groups), "tta": self.tta,
                "tta_variants": "JPEG quality 90 re-encode; 0.9x bilinear resize" if self.tta else None,
                "tiles": self.detector.tiles if self.detector.policy == "tiles" else None,
                "heatmap": None if not self.heatmaps else self._heatmap_kind()}

    def _heatmap_kind(self) -> str:
        if self.extractor.tiling is not None:
            k = self.extractor.tiling.per_side
            return f"{k}x{k} tiles of {self.detector.size} px (the detector's tiles)"
        if self.patch_heatmaps:
            return "ViT patch tokens"
        return f"{self.heatmap_tiles}x{self.heatmap_tiles} tiles"

    def _probability(self, pixels, records):
        return self.detector.probability(self.extractor.image_features(pixels, records))

    def map(self, images, records):
        per_tile = inside = None
        if self.extractor.tiling is not None:
            per_tile = self.extractor.tile_features(images)
            inside = self.extractor.tiling.inside(records)
            features = self.extractor.tiling.mean_inside(per_tile, inside)
        else:
            features = self.extractor(images)
        p = self.detector.probability(features)
        groups = self.detector.group_scores(features)
        fake = p >= self.detector.threshold
        labels = ["fake" if f else "real" for f in fake.tolist()]
        rows = [{"p_fake": float(p[i]), "label": labels[i],
                 **{f"score_{g}": float(v[i]) for g, v in groups.items()}} for i in range(len(records))]
        if self.tta:
            jpeg = self._probability(jpeg_round_trip(images, 90), records)
            size = images.shape[-1]
            small = F.interpolate(images.float(), scale_factor=0.9, mode="bilinear", antialias=True,
                                  align_corners=False)
            pad = size - small.shape[-1]
            resized = F.pad(small, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), mode="reflect")
            resized = self._probability(resized.round().clamp(0, 255).to(torch.uint8), records)
            for i, row in enumerate(rows):
                row.update(p_fake_jpeg=float(jpeg[i]), p_fake_resized=float(resized[i]))
                verdicts = {bool(p[i] >= self.detector.threshold), bool(jpeg[i] >= self.detector.threshold),
                            bool(resized[i] >= self.detector.threshold)}
                if len(verdicts) > 1:
                    row["label"] = "unsure"
        for row in rows:
            self._counts[row["label"]] += 1
        overlays = None
        if self.heatmaps and per_tile is not None:
            overlays = self._policy_tile_maps(per_tile, inside, p)
        elif self.patch_heatmaps:
            overlays = self._patch_maps(images, features)
        elif self.heatmaps:
            overlays = self._tile_maps(images)
        return MapOutput(rows, overlays)

    def _patch_maps(self, images, features) -> list[np.ndarray]:
        """p_fake of each ViT patch: the image's feature vector with its embedding replaced by the
        patch token's embedding (the other groups keep their image-level values)."""
        patches = self.extractor.patch_embeddings(images)  # [B, gh, gw, D]
        b, gh, gw, d = patches.shape
        columns = [i for i, name in enumerate(self.detector.feature_names) if name.startswith("emb_")]
        per_patch = features.float().cpu().repeat_interleave(gh * gw, dim=0)
        per_patch[:, columns] = patches.reshape(b * gh * gw, d).cpu()
        return list(self.detector.probability(per_patch).view(b, gh, gw).numpy())

    def _policy_tile_maps(self, per_tile, inside, p) -> list[np.ndarray]:
        """p_fake of each of the detector's tiles; tiles over padding show the image's p_fake."""
        b, count, d = per_tile.shape
        k = self.extractor.tiling.per_side
        tile_p = self.detector.probability(per_tile.reshape(b * count, d)).view(b, count)
        tile_p = torch.where(inside, tile_p, p.view(-1, 1).expand(b, count))
        return list(tile_p.view(b, k, k).numpy())

    def _tile_maps(self, images) -> list[np.ndarray]:
        """p_fake of each of k x k sub-tiles of the (square) crop: evidence from every part."""
        k = self.heatmap_tiles
        tiling = Tiling(min(images.shape[-2:]) // k, k)
        p = self.detector.probability(self.extractor(tiling.split(images))).view(images.shape[0], k, k)
        return list(p.cpu().numpy())

    def summary(self):
        return {f"labelled_{k}": v for k, v in self._counts.items()}
