"""The detect-aigi train and eval jobs: the feature map stage through the pipeline, then the reduce.

Both run the same map stage (one feature vector per labelled image, written
to ``OUTPUT.features.parquet`` through the engine, so it is resumable with
``--resume`` after an interruption), then train or evaluate on the gathered
vectors in memory (a few hundred floats per image).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from visbatch.core.errors import Interrupted, UsageError
from visbatch.core.files import utc_now
from visbatch.core.images import Geometry
from visbatch.core.outputs import read_run_metadata, row_key, write_parquet
from visbatch.core.pipeline import RunConfig, json_safe, run_pipeline
from visbatch.core.tasks.aigi.detector import (
    Detector,
    FeatureExtractor,
    FeatureTask,
    LabelledItems,
    evaluate,
    train_detector,
)
from visbatch.core.tasks.aigi.figures import eval_figures

MIN_PER_CLASS = 2  # one image of each class to train on and one to calibrate on


def features_path_for(output: str) -> str:
    stem = output[: -len(".safetensors")] if output.endswith(".safetensors") else output
    return stem + ".features.parquet"


def compute_features(
    data: LabelledItems,
    extractor: FeatureExtractor,
    geometry: Geometry,
    normalize_format: bool,
    host,
    config: RunConfig,
) -> tuple[list[int], torch.Tensor, list[str]]:
    """Run the feature map stage over ``data`` into ``config.output``; returns (indices of the items
    that gave finite features, their vectors [n, D], one-line reasons for the others)."""
    summary = run_pipeline(FeatureTask(extractor, geometry, normalize_format), host, data.items, config)
    if summary.interrupted:
        raise Interrupted(
            "interrupted while computing features; run the same command with --resume to "
            f"continue from the {summary.processed + summary.resumed} images done"
        )
    roots = read_run_metadata(config.output).get("roots") or [data.items[0].root]
    by_key = {row_key(r, roots[0]): r for r in pq.read_table(config.output).to_pylist()}
    keep, vectors, errors = [], [], []
    for i, item in enumerate(data.items):
        row = by_key.get((item.root, item.relpath))
        if row is not None and row["status"] == "ok":
            keep.append(i)
            vectors.append(np.asarray(row["features"], dtype=np.float32))
        else:
            errors.append(f"{item.relpath}: {row['error'] if row else 'missing'}")
    return keep, torch.from_numpy(np.stack(vectors)) if vectors else torch.empty(0), errors


def split_groups(data: LabelledItems, pattern: str) -> list[str]:
    """Each item's group for the held-out split: the pattern's match on its relative path (its
    first group if it has one); items that do not match are groups of their own."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--group-pattern is not a regular expression: {exc}")
    names = []
    for item in data.items:
        match = regex.search(item.relpath)
        key = (match.group(1) if match.groups() else match.group(0)) if match else item.relpath
        names.append(f"{item.root}:{key}" if match else f"{item.root}:{item.relpath}:own")
    return names


def check_class_counts(data: LabelledItems, what: str = "training") -> None:
    """Refuse data with too few images of a class to train and calibrate on."""
    fake = sum(data.labels)
    real = len(data.labels) - fake
    if real < MIN_PER_CLASS or fake < MIN_PER_CLASS:
        raise UsageError(
            f"{what} needs at least {MIN_PER_CLASS} real and {MIN_PER_CLASS} fake images with usable "
            f"features (one of each to train on, one to calibrate on); got {real} real, {fake} fake"
        )


@dataclass
class TrainSettings:
    groups: tuple[str, ...]
    policy: str
    size: int
    tiles: int = 1
    holdout: float = 0.25
    seed: int = 0
    l2: float | None = None  # None: each group's L2 chosen on the training folds
    select: bool = True  # leave-one-generator-out chooses the groups (generator folders only)
    group_pattern: str | None = None
    normalize_format: bool = False
    warnings: list[str] = field(default_factory=list)


def train_job(
    data: LabelledItems,
    extractor: FeatureExtractor,
    geometry: Geometry,
    host,
    backbone,
    settings: TrainSettings,
    config: RunConfig,
) -> tuple[Detector, dict]:
    """Features, then a calibrated detector; not-usable images are counted in ``settings.warnings``."""
    keep, vectors, errors = compute_features(data, extractor, geometry, settings.normalize_format, host, config)
    settings.warnings += [f"not used: {error}" for error in errors[:5]]
    if len(errors) > 5:
        settings.warnings.append(f"... and {len(errors) - 5} more images not used")
    kept = LabelledItems(
        [data.items[i] for i in keep], [data.labels[i] for i in keep], [data.generators[i] for i in keep]
    )
    check_class_counts(kept)
    names = extractor.names()
    if len(names) != vectors.shape[1]:
        raise RuntimeError(f"{vectors.shape[1]} features but {len(names)} names")
    groups = split_groups(kept, settings.group_pattern) if settings.group_pattern else None
    detector, report = train_detector(
        vectors,
        kept,
        settings.groups,
        names,
        settings.policy,
        settings.size,
        backbone.describe() if backbone else None,
        settings.holdout,
        settings.seed,
        settings.l2,
        tiles=settings.tiles,
        split_groups=groups,
        select=settings.select,
    )
    detector.training["normalize_format"] = settings.normalize_format
    detector.training["unreadable"] = len(errors)
    report["unreadable"] = len(errors)
    for group in report["groups_at_chance"]:
        settings.warnings.append(
            f"feature group {group} is at chance on held-out folds ({report['folds']} "
            f"folds, AUROC {report['groups'][group]['fold_auroc_mean']:.2f}): it does not "
            "carry over to images it did not train on"
        )
    if report["calibration_reversed"]:
        settings.warnings.append(
            "on the held-out split this detector ranks real images above fakes (calibration slope <= 0): it "
            "does not hold on images it did not train on; its scores keep the training's direction, "
            "calibrated flat (p_fake near 0.5)"
        )
    dropped = [g for g in report["requested_groups"] if g not in report["selected_groups"]]
    if dropped:
        settings.warnings.append(
            f"leave-one-generator-out dropped {', '.join(dropped)} (no gain on held-out "
            "generators); --keep-all-groups keeps them"
        )
    return detector, report


def evaluate_job(
    data: LabelledItems,
    detector: Detector,
    extractor: FeatureExtractor,
    geometry: Geometry,
    host,
    normalize_format: bool,
    config: RunConfig,
    output: str,
    metadata: dict,
) -> tuple[list[dict], list[str]]:
    """Features, then per-generator figures written to ``output``; returns (rows, unusable images)."""
    keep, vectors, errors = compute_features(data, extractor, geometry, normalize_format, host, config)
    if not keep:
        raise UsageError(f"none of the {len(data.items)} images could be scored (first: {errors[0]})")
    p_fake = detector.probability(vectors)
    rows = evaluate([data.labels[i] for i in keep], [data.generators[i] for i in keep], p_fake, detector.threshold)
    rows = json_safe(rows)  # an AP without fakes is undefined: null, not NaN
    # The run's own facts (command, backbone, device, precision, engine, times) are the feature
    # stage's: the report's header shows them as for any other output.
    run = read_run_metadata(config.output)
    facts = ("command_line", "model", "device", "precision", "engine", "started_at", "visbatch_version")
    metadata = {**{k: run[k] for k in facts if k in run}, **metadata, "finished_at": utc_now()}
    figures = eval_figures(
        [data.items[i] for i in keep],
        [data.labels[i] for i in keep],
        [data.generators[i] for i in keep],
        p_fake.cpu().numpy(),
        detector.threshold,
    )
    write_parquet(output, pa.Table.from_pylist(rows), {**metadata, "unreadable": len(errors), "figures": figures})
    return rows, errors


def remove_features(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def labelled_roots(data: LabelledItems) -> Sequence[str]:
    return sorted({item.root for item in data.items})
