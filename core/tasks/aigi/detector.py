"""detect-aigi's detector: the file format (format 2, reads 1), UnivFD heads, training with
per-group fusion and calibration, and evaluation per generator.

Rooms: :mod:`.inputs` (labelled inputs), :mod:`.extract` (feature groups and
extraction), :mod:`.features` (the artefact maths), :mod:`.classifier`,
:mod:`.fusion`, :mod:`.score` (the scoring task), :mod:`.job` (the jobs).

Over 400 lines on purpose: the file format, training and evaluation share the Detector type and are
read together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from visbatch.core.files import atomic_path
from visbatch.core.images import InputError
from visbatch.core.models import LoadedModel, ModelError
from visbatch.core.tasks.aigi.classifier import LogisticModel
from visbatch.core.tasks.aigi.extract import (  # noqa: F401  (the detector's public names)
    ARTEFACT_GROUPS,
    BACKBONE_GROUPS,
    FEATURE_GROUP_REGISTRY,
    FEATURE_GROUPS,
    POLICIES,
    FeatureExtractor,
    FeatureGroup,
    FeatureTask,
    Tiling,
    jpeg_round_trip,
    policy_geometry,
)
from visbatch.core.tasks.aigi.fusion import FusedClassifier, GroupModel
from visbatch.core.tasks.aigi.inputs import (  # noqa: F401
    LabelledItems,
    format_confounds,
    read_labelled_folders,
    read_labelled_root,
)

DETECTOR_FORMAT = "visbatch-aigi-detector"
DETECTOR_VERSION = 2  # 2: per-group regressions fused by a stacked one; 1 (one regression) still loads


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
            out[group] = contributions[:, start : start + width].sum(dim=1)
            start += width
        return out

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        def linear(prefix: str, model: LogisticModel) -> dict[str, torch.Tensor]:
            return {
                f"{prefix}mean": model.mean.cpu(),
                f"{prefix}std": model.std.cpu(),
                f"{prefix}weight": model.weight.cpu(),
                f"{prefix}bias": model.bias.cpu().reshape(1),
            }

        if isinstance(self.classifier, FusedClassifier):
            tensors = linear("fusion.", self.classifier.fusion)
            for member in self.classifier.members:
                tensors.update(linear(f"group.{member.group}.", member.model))
            classifier = {"kind": "fused", "members": [{"group": m.group, "l2": m.l2} for m in self.classifier.members]}
        else:
            tensors, classifier = linear("", self.classifier), {"kind": "linear"}
        metadata = {
            "format": DETECTOR_FORMAT,
            "format_version": str(DETECTOR_VERSION),
            "config": json.dumps(
                {
                    "groups": list(self.groups),
                    "feature_names": self.feature_names,
                    "platt": list(self.platt),
                    "threshold": self.threshold,
                    "policy": self.policy,
                    "size": self.size,
                    "backbone": self.backbone,
                    "training": self.training,
                    "raw_embedding": self.raw_embedding,
                    "tiles": self.tiles,
                    "classifier": classifier,
                }
            ),
        }
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
            raise ModelError(
                f"{path}: detector format version {metadata.get('format_version')} is not supported "
                f"(this visbatch reads 1 and {DETECTOR_VERSION})"
            )
        try:
            config = json.loads(metadata["config"])
            classifier = _load_classifier(tensors, config)
            numbers = [float(v) for v in (*config["platt"], config["threshold"])]
            if len(config["platt"]) != 2 or not all(np.isfinite(numbers)) or not 0 <= config["threshold"] <= 1:
                raise ValueError("platt/threshold are not finite numbers (threshold in [0, 1])")
            names = config["feature_names"]
            if len(set(names)) != len(names) or any(_group_of(n) not in config["groups"] for n in names):
                raise ValueError("feature names repeat or do not belong to the detector's groups")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: damaged detector file ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return cls(
            classifier,
            tuple(config["groups"]),
            config["feature_names"],
            tuple(config["platt"]),
            config["threshold"],
            config["policy"],
            config["size"],
            config["backbone"],
            config["training"],
            config.get("raw_embedding", False),
            int(config.get("tiles", 1)),
        )

    def check_backbone(self, model: LoadedModel | None) -> None:
        """Refuse a backbone other than the one the detector was trained with."""
        if self.backbone is None:
            return
        if model is None or model.checksum != self.backbone.get("checksum"):
            got = "none" if model is None else f"{model.spec} ({model.checksum[:19]}...)"
            raise ModelError(
                f"the detector was trained on backbone {self.backbone.get('spec')} "
                f"({str(self.backbone.get('checksum'))[:19]}...), not {got}; pass the same --model"
            )


def _load_classifier(tensors: dict[str, torch.Tensor], config: dict) -> LogisticModel | FusedClassifier:
    """The classifier a detector file holds, its shapes checked against the feature names."""

    def linear(prefix: str, width: int) -> LogisticModel:
        model = LogisticModel(
            tensors[f"{prefix}mean"].float(),
            tensors[f"{prefix}std"].float(),
            tensors[f"{prefix}weight"].float(),
            tensors[f"{prefix}bias"].float().reshape(()),
        )
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
        members.append(
            GroupModel(entry["group"], columns, linear(f"group.{entry['group']}.", len(columns)), float(entry["l2"]))
        )
    return FusedClassifier(members, linear("fusion.", len(members)))


def group_columns(feature_names: Sequence[str], groups: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each group's column indices in a feature vector with these names."""
    return {
        g: torch.tensor([i for i, n in enumerate(feature_names) if _group_of(n) == g], dtype=torch.long) for g in groups
    }


def _group_of(name: str) -> str:
    """The feature group a column belongs to, by its name's prefix."""
    for group, spec in FEATURE_GROUP_REGISTRY.items():
        if name.startswith(spec.prefix):
            return group
    raise ValueError(f"feature column {name!r} belongs to no group")


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
        raise ModelError(
            f"{path}: head expects {dim}-d features but {backbone.spec} gives {backbone_dim}-d "
            "(UnivFD's head needs --model ViT-L-14 --pretrained openai)"
        )
    # UnivFD applies its head to the embedding as it comes out of the image tower (not normalized).
    classifier = LogisticModel(torch.zeros(dim), torch.ones(dim), weight[0], bias[0])
    return Detector(
        classifier,
        ("embedding",),
        [f"emb_{i}" for i in range(dim)],
        (1.0, 0.0),
        0.5,
        "resize",
        min(backbone.preprocess.geometry.crop),
        backbone.describe(),
        {"source": f"UnivFD head {path}"},
        raw_embedding=True,
    )


def stratified_split(
    labels: Sequence[int] | np.ndarray, holdout: float, seed: int, groups: Sequence[str] | None = None
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


def train_detector(
    features: torch.Tensor,
    data: LabelledItems,
    groups,
    feature_names,
    policy,
    size,
    backbone,
    holdout: float = 0.25,
    seed: int = 0,
    l2: float | None = None,
    tiles: int = 1,
    split_groups: Sequence[str] | None = None,
    select: bool = True,
) -> tuple[Detector, dict]:
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
    fit = fit_fused(
        features[train],
        train_labels,
        columns,
        folds,
        fold_kind,
        fold_names,
        select=select and fold_kind == "generator" and len(groups) > 1,
        l2=l2,
    )
    # The detector keeps only the selected groups' columns (scoring computes nothing else).
    kept_names = [n for n in feature_names if _group_of(n) in fit.selected]
    kept_columns = torch.cat([columns[g] for g in fit.selected]).sort().values
    new_columns = group_columns(kept_names, fit.selected)
    for member in fit.classifier.members:
        member.columns = new_columns[member.group]
    classifier = fit.classifier
    held_logits = classifier.logits(features[held][:, kept_columns])
    platt = fit_platt(held_logits, labels[held])
    # A negative slope would turn the ranking the training chose upside down: it says the detector
    # does not hold on the held-out split, which is a warning to give, not a direction to flip.
    ranking_reversed = platt[0] <= 0
    if ranking_reversed:
        platt = (1e-3, 0.0)
    held_p = torch.sigmoid(platt[0] * held_logits + platt[1])
    threshold = choose_threshold(held_p, labels[held])
    summary = {}
    for generator in sorted(set(data.generators)):
        mask = [g == generator for g in data.generators]
        summary[generator] = {
            "real": int(sum(1 for m, y in zip(mask, data.labels) if m and y == 0)),
            "fake": int(sum(1 for m, y in zip(mask, data.labels) if m and y == 1)),
        }
    table = [
        {
            "held_out": fold_names[fold],
            "fused": fit.fused_per_fold_ap.get(fold),
            **{c.group: c.per_fold_ap.get(fold) for c in fit.checks},
        }
        for fold in range(len(fold_names))
    ]
    report = {
        "train": len(train),
        "held_out": len(held),
        "split_groups": None if split_groups is None else len(set(split_groups)),
        "held_out_ap": average_precision(labels[held], held_p),
        "held_out_auroc": auroc(labels[held], held_p),
        "held_out_ece": expected_calibration_error(held_p, labels[held]),
        "threshold": threshold,
        "platt": list(platt),
        "per_generator": summary,
        "requested_groups": list(groups),
        "selected_groups": fit.selected,
        "folds": fold_kind,
        "fold_ap": table,
        "fused_fold_ap_mean": fit.fused_mean_ap,
        "groups": {
            c.group: {"l2": c.l2, "fold_ap_mean": c.mean_ap, "fold_auroc_mean": c.mean_auroc} for c in fit.checks
        },
        "fusion_weights": {m.group: float(w) for m, w in zip(classifier.members, classifier.fusion.weight)},
        "groups_at_chance": chance_groups(fit.checks),
        "calibration_reversed": ranking_reversed,
    }
    detector = Detector(
        classifier,
        tuple(fit.selected),
        kept_names,
        platt,
        threshold,
        policy,
        size,
        backbone if any(g in BACKBONE_GROUPS for g in fit.selected) else None,
        training=report,
        tiles=tiles,
    )
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
        rows.append(
            {
                "generator": generator,
                "n_real": int(real.sum()),
                "n_fake": int(fake.sum()),
                "ap": average_precision(y, p) if fake.any() else float("nan"),
                "auroc": auroc(y, p),
                "acc_at_0_5": float(((p >= 0.5).long() == y).float().mean()),
                "acc_at_threshold": float(((p >= threshold).long() == y).float().mean()),
                "real_acc": float((p[real] < threshold).float().mean()) if real.any() else float("nan"),
                "fake_acc": float((p[fake] >= threshold).float().mean()) if fake.any() else float("nan"),
            }
        )
    return rows
