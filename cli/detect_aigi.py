"""`visbatch detect-aigi train|score|eval`: detectors of AI-generated images."""

import json
import sys
from typing import Annotated, Optional

import typer

from visbatch.cli.common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    AlphaOpt,
    BatchSizeOpt,
    CheckedCommand,
    ColormapOpt,
    ConcurrencyOpt,
    DeviceOpt,
    EngineOpt,
    GpusPerWorkerOpt,
    JsonOpt,
    OverlaySizeOpt,
    OverlayStyleOpt,
    OverwriteOpt,
    PrecisionOpt,
    QuietOpt,
    RayAddressOpt,
    ReportOpt,
    WorkersOpt,
    find_inputs,
    finish,
    guarded,
    job_command,
    overlay_settings,
    parse_engine,
    pipeline_config,
)
from visbatch.cli.panels import PlainFlagsGroup

NormalizeFormatOpt = typer.Option(False, "--normalize-format", help="Re-encode every image as JPEG q95.")
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue an interrupted run from the features already computed (OUTPUT.features.parquet)."
    ),
]

app = typer.Typer(
    cls=PlainFlagsGroup,
    help="Train, score and evaluate detectors of AI-generated images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _f(value, width: int) -> str:
    """A figure for the table: 3 decimals, or a dash where it is undefined (null)."""
    return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}s}"


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def fold_table(report: dict) -> str:
    """The held-out AP per fold (per held-out generator with generator folders): each group alone and fused."""
    groups = list(report["groups"])
    head = "held-out generator" if report["folds"] == "generator" else "held-out fold"
    width = max([len(head)] + [len(str(row["held_out"])) for row in report["fold_ap"]])
    lines = [f"{head:<{width}} " + " ".join(f"{g:>9s}" for g in groups) + f" {'fused':>9s}"]
    for row in report["fold_ap"]:
        lines.append(
            f"{str(row['held_out']):<{width}} " + " ".join(_f(row[g], 9) for g in groups) + " " + _f(row["fused"], 9)
        )
    means = [report["groups"][g]["fold_ap_mean"] for g in groups]
    lines.append(
        f"{'mean AP':<{width}} " + " ".join(_f(m, 9) for m in means) + " " + _f(report["fused_fold_ap_mean"], 9)
    )
    lines.append(
        f"kept groups: {', '.join(report['selected_groups'])} (L2 "
        + ", ".join(f"{g} {report['groups'][g]['l2']:g}" for g in report["selected_groups"])
        + ")"
    )
    return "\n".join(lines)


@app.command("train", cls=CheckedCommand)
def train(
    root: Optional[str] = typer.Argument(None, help="Labelled root: 0_real/ and 1_fake/ (optionally per generator)."),
    real: Optional[list[str]] = typer.Option(None, "--real", help="Folder of real images (repeatable)."),
    fake: Optional[list[str]] = typer.Option(None, "--fake", help="Folder of generated images (repeatable)."),
    features: str = typer.Option(
        "npr,bitplane,spectrum,layers",
        "--features",
        help="Comma-separated groups: embedding, layers, npr, bitplane, spectrum.",
    ),
    model: str = typer.Option(
        "efficientnet-lite0", "--model", "-m", help="Backbone of the embedding group.", envvar="VISBATCH_MODEL"
    ),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", envvar="VISBATCH_PRETRAINED"),
    univfd_head: Optional[str] = typer.Option(
        None,
        "--univfd-head",
        help="Use UnivFD's released linear head "
        "(weight [1, 768], bias) instead of training (--model ViT-L-14 "
        "--pretrained openai).",
    ),
    policy: str = typer.Option(
        "crop",
        "--policy",
        help="crop (native resolution, default), resize, or tiles "
        "(--tiles x --tiles native-resolution tiles of --size, features averaged).",
    ),
    size: int = typer.Option(256, "--size", min=32, max=2048, help="Side of the crop (or tile) the detector looks at."),
    tiles: int = typer.Option(3, "--tiles", min=1, max=16, help="With --policy tiles: tiles per side."),
    holdout: float = typer.Option(0.25, "--holdout", min=0.05, max=0.9, help="Share held out for calibration."),
    seed: int = typer.Option(0, "--seed"),
    group_pattern: Optional[str] = typer.Option(
        None,
        "--group-pattern",
        help="Regex on each image's relative path; images with the same match (its "
        "first group if it has one) stay on one side of the held-out split, e.g. '(.*)_\\d+\\.jpg$' for crops "
        "of one photo.",
    ),
    l2: Optional[float] = typer.Option(
        None,
        "--l2",
        min=0.0,
        help="L2 regularisation of every group's logistic regression (default: each "
        "group's own, chosen on held-out folds of the training data).",
    ),
    keep_all_groups: bool = typer.Option(
        False,
        "--keep-all-groups",
        help="Keep every --features group (by default, with generator folders, "
        "leave-one-generator-out keeps only the groups that help on held-out generators).",
    ),
    normalize_format: bool = NormalizeFormatOpt,
    output: str = typer.Option("detector.safetensors", "--output", "-o"),
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 0,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = "auto",
    gpus_per_worker: GpusPerWorkerOpt = None,
    concurrency: ConcurrencyOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a calibrated detector from labelled folders and write it as safetensors + JSON metadata."""
    from visbatch.core.pipeline import json_safe
    from visbatch.core.tasks.aigi.command import RunSettings, TrainRequest, train_command

    def job() -> int:
        request = TrainRequest(
            output=output,
            root=root,
            real=list(real or []),
            fake=list(fake or []),
            features=features,
            model=model,
            pretrained=pretrained,
            univfd_head=univfd_head,
            policy=policy,
            size=size,
            tiles=tiles,
            holdout=holdout,
            seed=seed,
            group_pattern=group_pattern,
            l2=l2,
            keep_all_groups=keep_all_groups,
            normalize_format=normalize_format,
            overwrite=overwrite,
            resume=resume,
            run=RunSettings(
                device,
                precision,
                batch_size,
                workers,
                quiet,
                parse_engine(engine, ray_address, gpus_per_worker, concurrency),
            ),
        )
        result = train_command(request, lambda text: _say(quiet, f"visbatch: warning: {text}"))
        report = result.report
        if report is None:
            _say(quiet, f"visbatch detect-aigi: UnivFD head saved as {output}")
            return EXIT_OK
        for warning in result.warnings:
            _say(quiet, f"visbatch: warning: {warning}")
        if as_json:
            print(json.dumps(json_safe(report), allow_nan=False))
        _say(quiet, fold_table(report))
        _say(
            quiet,
            f"visbatch detect-aigi train: {report['train'] + report['held_out']} images, "
            f"held-out AP {report['held_out_ap']:.3f}, AUROC {report['held_out_auroc']:.3f}, "
            f"ECE {report['held_out_ece']:.3f}, threshold {report['threshold']:.3f}\n  detector: {output}"
            f"\n  features: {result.features_path}",
        )
        return EXIT_OK

    raise typer.Exit(guarded(job, quiet))


@job_command(default_model="detector")
def score(
    common,
    detector: str = typer.Option(..., "--detector", help="A detector file from `detect-aigi train`."),
    tta: bool = typer.Option(
        False, "--tta", help="Also score a JPEG q90 and a 0.9x resized copy; label 'unsure' when the verdict flips."
    ),
    heatmaps: Optional[str] = typer.Option(None, "--heatmaps", help="Folder for per-patch p_fake overlays."),
    overlay_size: OverlaySizeOpt = 512,
    colormap: ColormapOpt = "inferno",
    alpha: AlphaOpt = 0.5,
    overlay_style: OverlayStyleOpt = "blend",
):
    """Score images: calibrated p_fake, a label, each feature group's share; heatmaps per patch."""
    from visbatch.core.models import DeviceOnly
    from visbatch.core.pipeline import run_pipeline
    from visbatch.core.tasks.aigi.command import RunSettings, backbone_for
    from visbatch.core.tasks.aigi.detector import Detector, FeatureExtractor
    from visbatch.core.tasks.aigi.score import ScoreTask

    def job() -> int:
        loaded = Detector.load(detector)
        items = find_inputs(common, stream=True)
        run = RunSettings(common.device, common.precision)
        backbone = backbone_for(loaded, common.model, common.pretrained, run)
        host = backbone or DeviceOnly(common.device)
        extractor = FeatureExtractor(backbone, loaded.groups, loaded.raw_embedding, tiling=loaded.tiling())
        task = ScoreTask(loaded, extractor, tta=tta, heatmaps=bool(heatmaps))
        settings = overlay_settings(heatmaps, overlay_size, colormap, alpha, overlay_style)
        config = pipeline_config(
            common, "detect-aigi", host, items, files=[detector], overlays_option="--heatmaps", **settings
        )
        summary = run_pipeline(task, host, items, config)
        return finish(summary, common)

    raise typer.Exit(guarded(job, common.quiet))


@app.command("eval", cls=CheckedCommand)
def evaluate_command(
    root: str = typer.Argument(..., help="Labelled root: 0_real/ and 1_fake/, optionally per generator."),
    detector: str = typer.Option(..., "--detector"),
    model: str = typer.Option("detector", "--model", "-m", help="Backbone (default: the detector's)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained"),
    min_ap: Optional[float] = typer.Option(None, "--min-ap", help="Exit 1 when the overall AP is below this."),
    normalize_format: bool = NormalizeFormatOpt,
    output: str = typer.Option("detect-aigi-eval.parquet", "--output", "-o"),
    overwrite: OverwriteOpt = False,
    report: ReportOpt = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 0,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = "auto",
    gpus_per_worker: GpusPerWorkerOpt = None,
    concurrency: ConcurrencyOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Per generator and overall AP, AUROC and accuracies of a detector on a labelled root."""
    from visbatch.core.tasks.aigi.command import EvalRequest, RunSettings, evaluate_command

    def job() -> int:
        from visbatch.core.prepare import report_beside

        html = report_beside(output, overwrite) if report else None
        request = EvalRequest(
            root=root,
            detector=detector,
            output=output,
            model=model,
            pretrained=pretrained,
            normalize_format=normalize_format,
            overwrite=overwrite,
            resume=resume,
            run=RunSettings(
                device,
                precision,
                batch_size,
                workers,
                quiet,
                parse_engine(engine, ray_address, gpus_per_worker, concurrency),
            ),
            min_ap=min_ap,
            html=html,
        )
        rows, errors = evaluate_command(request, lambda text: _say(quiet, f"visbatch: warning: {text}"))
        overall = rows[-1]
        if as_json:
            print(json.dumps({"rows": rows, "unreadable": len(errors)}, allow_nan=False))
        if not quiet:
            header = (
                f"{'generator':20s} {'n_real':>6s} {'n_fake':>6s} {'AP':>6s} {'AUROC':>6s} {'acc@.5':>7s} "
                f"{'acc@thr':>7s} {'real':>6s} {'fake':>6s}"
            )
            print(header, file=sys.stderr)
            for r in rows:
                print(
                    f"{r['generator'][:20]:20s} {r['n_real']:6d} {r['n_fake']:6d} {_f(r['ap'], 6)} "
                    f"{_f(r['auroc'], 6)} {_f(r['acc_at_0_5'], 7)} {_f(r['acc_at_threshold'], 7)} "
                    f"{_f(r['real_acc'], 6)} {_f(r['fake_acc'], 6)}",
                    file=sys.stderr,
                )
            for error in errors[:5]:
                print(f"visbatch: warning: not scored: {error}", file=sys.stderr)
        if html and not quiet:
            print(f"  report: {html}", file=sys.stderr)
        if min_ap is not None and not (overall["ap"] is not None and overall["ap"] >= min_ap):
            _say(quiet, f"visbatch: AP {_f(overall['ap'], 5)} is below --min-ap {min_ap}")
            return EXIT_SOME_FAILED
        return EXIT_OK

    raise typer.Exit(guarded(job, quiet))


app.command("score", cls=CheckedCommand)(score)
