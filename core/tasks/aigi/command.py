"""From the options of ``detect-aigi train`` / ``eval`` to the written detector or table.

Each command checks its options, reads the labelled inputs, names every file it
will write and runs through :func:`visbatch.core.jobs.run_job` (checks before
anything is created, the output locked); :mod:`.job` holds the map stage and the
reduce. The CLI builds the request and prints the result.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from visbatch.core.engines import EngineOptions
from visbatch.core.errors import UsageError
from visbatch.core.jobs import JobOutput, plan_job, run_job
from visbatch.core.models import DeviceOnly, load_model
from visbatch.core.models.devices import PRECISIONS
from visbatch.core.outputs import output_task
from visbatch.core.pipeline import RunConfig, check_outputs
from visbatch.core.plan import InputSet, RunPlan, as_local, local_path_of
from visbatch.core.prepare import run_plan
from visbatch.core.tasks.aigi.detector import (
    ARTEFACT_GROUPS,
    BACKBONE_GROUPS,
    FEATURE_GROUPS,
    POLICIES,
    Detector,
    FeatureExtractor,
    Tiling,
    format_confounds,
    policy_geometry,
    read_labelled_folders,
    read_labelled_root,
    univfd_detector,
)
from visbatch.core.tasks.aigi.job import TrainSettings, evaluate_job, features_path_for, remove_features, train_job

Warn = Callable[[str], None]


@dataclass
class RunSettings:
    """Where and how the map stage runs: the options every subcommand shares."""

    device: str = "auto"
    precision: str = "auto"  # of the backbone; pixel-statistics groups always run in fp32
    batch_size: int = 16
    workers: int = 0
    quiet: bool = False
    engine: EngineOptions | None = None  # where the feature map stage runs (None: this process)

    def __post_init__(self):
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r} (use auto, fp32, bf16 or fp16)")


def features_config(path: str, run: RunSettings, resume: bool, plan: RunPlan, quiet: bool) -> RunConfig:
    """The feature map stage's run, into ``path`` (resumable with --resume), declared in the job's
    plan (the features file, its parts and lock); the caller checks it with the plan."""
    config = RunConfig(
        output=path,
        batch_size=run.batch_size,
        workers=run.workers,
        quiet=quiet,
        resume=resume,
        overwrite=not resume,
        plan=plan,
        engine=run.engine,
    )
    plan.write_results(path, "features file")
    return config


def check_features(config: RunConfig, overwrite: bool) -> None:
    """After the plan's check: the features run's own checks; an existing file there is replaced
    only when it is a features table of an earlier run (or with --overwrite)."""
    path = config.output
    if os.path.exists(path) and not (config.resume or overwrite) and output_task(path) != "detect-aigi-features":
        raise UsageError(
            f"{path} exists and is not a visbatch features table; move it, or pass --overwrite to replace it"
        )
    check_outputs(config)


def job_plan(reads: InputSet | None, *files: str | None) -> RunPlan:
    """A job's plan reading what the labelled folders read plus the named files (model, detector)."""
    return run_plan(reads, files)


def load_backbone(spec: str, pretrained: str | None, run: RunSettings):
    return load_model(spec, pretrained, run.device, run.precision)


def backbone_for(detector: Detector, model: str, pretrained: str | None, run: RunSettings):
    """The detector's backbone (``model == "detector"``: the one it was trained on), checked
    against the checksum it recorded; None when its groups need no network."""
    if not any(group in BACKBONE_GROUPS for group in detector.groups):
        return None
    own = model == "detector"
    spec = detector.backbone["spec"] if own else model
    if pretrained is None and own:
        pretrained = detector.backbone.get("pretrained")
    backbone = load_backbone(spec, pretrained, run)
    detector.check_backbone(backbone)
    return backbone


@dataclass
class TrainRequest:
    output: str
    root: str | None = None
    real: list[str] = field(default_factory=list)
    fake: list[str] = field(default_factory=list)
    features: str = "npr,bitplane,spectrum,layers"
    model: str = "efficientnet-lite0"
    pretrained: str | None = None
    univfd_head: str | None = None
    policy: str = "crop"
    size: int = 256
    tiles: int = 3
    holdout: float = 0.25
    seed: int = 0
    group_pattern: str | None = None
    l2: float | None = None
    keep_all_groups: bool = False
    normalize_format: bool = False
    overwrite: bool = False
    resume: bool = False
    run: RunSettings = field(default_factory=RunSettings)


@dataclass
class TrainResult:
    report: dict | None  # None for a UnivFD head (nothing trained)
    features_path: str | None
    warnings: list[str]  # said after the run (those about the data are said before it)


def _groups(request: TrainRequest) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in request.features.split(",") if g.strip())
    if len(set(groups)) != len(groups):
        raise UsageError(f"--features names a group twice: {request.features}")
    unknown = [g for g in groups if g not in FEATURE_GROUPS]
    if not request.univfd_head and (not groups or unknown):
        raise UsageError(f"--features: unknown {unknown} (choose from {', '.join(FEATURE_GROUPS)})")
    return groups


def train_command(request: TrainRequest, warn: Warn) -> TrainResult:
    """Check, read the labelled folders, compute features (resumable), train, save the detector."""
    request.output = as_local(request.output) or request.output
    output, run = request.output, request.run
    if not output.endswith(".safetensors"):
        raise UsageError("-o must name a .safetensors file")
    if local_path_of(output) is None:
        raise UsageError(f"-o {output}: detect-aigi train writes a local file (upload it with your storage's tools)")
    if os.path.exists(output) and not request.overwrite:
        raise UsageError(f"output {output} exists; pass --overwrite to replace it")
    groups = _groups(request)
    if request.l2 is not None and not math.isfinite(request.l2):
        raise UsageError("--l2 must be a finite number >= 0")
    if request.policy not in POLICIES:
        raise UsageError("--policy must be crop, resize or tiles")
    if request.group_pattern is not None:
        try:
            re.compile(request.group_pattern)
        except re.error as exc:
            raise UsageError(f"--group-pattern is not a regular expression: {exc}")
    both = {os.path.realpath(f) for f in request.real} & {os.path.realpath(f) for f in request.fake}
    if both:
        raise UsageError(f"--real and --fake name the same folder ({sorted(both)[0]}): an image has one label")
    if request.univfd_head:
        plan = job_plan(None, request.univfd_head, request.pretrained, request.model)
        outputs = [JobOutput(output)]
        plan_job(plan, outputs, request.overwrite)
        backbone = load_backbone(request.model, request.pretrained, run)
        run_job(
            plan,
            outputs,
            request.overwrite,
            lambda: univfd_detector(request.univfd_head, backbone).save(outputs[0].target),
        )
        return TrainResult(None, None, [])
    if request.root and (request.real or request.fake):
        raise UsageError("give a labelled ROOT or --real/--fake, not both")
    if not request.root and not (request.real and request.fake):
        raise UsageError("give a labelled ROOT (0_real/, 1_fake/) or both --real and --fake")
    data = read_labelled_root(request.root) if request.root else read_labelled_folders(request.real, request.fake)
    features_path = features_path_for(output)
    plan = job_plan(data.reads, request.pretrained, request.model)
    outputs = [JobOutput(output)]
    config = features_config(features_path, run, request.resume, plan, quiet=run.quiet)
    plan_job(plan, outputs, request.overwrite)
    check_features(config, request.overwrite)
    for warning in format_confounds(data):
        warn(warning)
    if request.policy == "resize" and any(g in ARTEFACT_GROUPS for g in groups):
        warn(
            "--policy resize resamples every image, which erases the up-sampling "
            "traces the npr, bitplane and spectrum groups look for"
        )
    needs_backbone = any(g in BACKBONE_GROUPS for g in groups)
    backbone = load_backbone(request.model, request.pretrained, run) if needs_backbone else None
    host = backbone or DeviceOnly(run.device)
    tile_count = request.tiles if request.policy == "tiles" else 1
    tiling = Tiling(request.size, tile_count) if request.policy == "tiles" else None
    extractor = FeatureExtractor(backbone, groups, tiling=tiling)
    settings = TrainSettings(
        groups,
        request.policy,
        request.size,
        tile_count,
        request.holdout,
        request.seed,
        request.l2,
        not request.keep_all_groups,
        request.group_pattern,
        request.normalize_format,
    )
    geometry = policy_geometry(request.policy, request.size, tile_count)

    def body() -> dict:
        detector, report = train_job(data, extractor, geometry, host, backbone, settings, config)
        detector.save(outputs[0].target)
        return report

    report = run_job(plan, outputs, request.overwrite, body)
    return TrainResult(report, features_path, settings.warnings)


@dataclass
class EvalRequest:
    root: str
    detector: str
    output: str = "detect-aigi-eval.parquet"
    model: str = "detector"
    pretrained: str | None = None
    normalize_format: bool = False
    overwrite: bool = False
    resume: bool = False
    run: RunSettings = field(default_factory=RunSettings)
    min_ap: float | None = None  # checked here; the gate itself is the CLI's exit code
    html: str | None = None  # --report: the evaluation's HTML report, written beside it


def evaluate_command(request: EvalRequest, warn: Warn) -> tuple[list[dict], list[str]]:
    """Per generator and overall figures of a detector on a labelled root, written to the output;
    returns (rows, one-line reasons for the images that could not be scored)."""
    request.output = as_local(request.output) or request.output
    output, run = request.output, request.run
    if request.min_ap is not None and not 0 <= request.min_ap <= 1:
        raise UsageError("--min-ap must be between 0 and 1")
    if local_path_of(output) is None:
        raise UsageError(f"-o {output}: detect-aigi eval writes a local file (upload it with your storage's tools)")
    if os.path.isdir(output):
        raise UsageError(f"output {output} is a folder; give a file path")
    if os.path.exists(output) and not request.overwrite:
        raise UsageError(f"output {output} exists; pass --overwrite to replace it")
    data = read_labelled_root(request.root)
    features_path = output + ".features.parquet"
    plan = job_plan(data.reads, request.detector, request.pretrained, request.model)
    outputs = [JobOutput(output)] + ([JobOutput(request.html, "report")] if request.html else [])
    config = features_config(features_path, run, request.resume, plan, quiet=True)
    plan_job(plan, outputs, request.overwrite)
    check_features(config, request.overwrite)
    loaded = Detector.load(request.detector)
    confounds = format_confounds(data)
    for warning in confounds:
        warn(warning)
    backbone = backbone_for(loaded, request.model, request.pretrained, run)
    host = backbone or DeviceOnly(run.device)
    extractor = FeatureExtractor(backbone, loaded.groups, loaded.raw_embedding, tiling=loaded.tiling())
    metadata = {
        "confound_warnings": list(confounds),
        "task": "detect-aigi-eval",
        "detector": os.path.abspath(request.detector),
        "root": os.path.abspath(request.root),
        "threshold": loaded.threshold,
        "normalize_format": request.normalize_format,
    }
    geometry = policy_geometry(loaded.policy, loaded.size, loaded.tiles)

    def body() -> tuple[list[dict], list[str]]:
        result = evaluate_job(
            data, loaded, extractor, geometry, host, request.normalize_format, config, outputs[0].target, metadata
        )
        remove_features(features_path)
        if request.html:
            from visbatch.core.report import build_report

            build_report([outputs[0].target], outputs[1].target)
        return result

    return run_job(plan, outputs, request.overwrite, body)
