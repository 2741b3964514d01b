"""`visbatch detect-aigi train|score|eval`: detectors of AI-generated images."""

import json
import os
import sys
from typing import List, Optional

import typer

from visbatch.cli.common import (
    EXIT_OK, EXIT_SOME_FAILED, AlphaOpt, BatchSizeOpt, ColormapOpt, DeviceOpt, JsonOpt, OverlaySizeOpt,
    OverlayStyleOpt, OverwriteOpt, QuietOpt, UsageError, WorkersOpt, find_inputs, finish, guarded, job_command,
    overlay_settings, pipeline_config,
)
NormalizeFormatOpt = typer.Option(False, "--normalize-format", help="Re-encode every image as JPEG q95.")

app = typer.Typer(help="Train, score and evaluate detectors of AI-generated images.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _features_for(data, extractor, geometry, normalize_format, model, output, batch_size, workers, quiet):
    """Run the feature map stage (one row per image, written beside the detector) and gather the vectors."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.tasks.aigi.detector import FeatureTask

    config = RunConfig(output=output, batch_size=batch_size, workers=workers, quiet=quiet, overwrite=True)
    run_pipeline(FeatureTask(extractor, geometry, normalize_format), model, data.items, config)
    rows = pq.read_table(output).to_pylist()
    # A single-root output has no root column: every row is under that root.
    by_key = {(r.get("root", data.items[0].root), r["path"]): r for r in rows}
    keep, vectors, errors = [], [], []
    for i, item in enumerate(data.items):
        row = by_key.get((item.root, item.relpath))
        if row is not None and row["status"] == "ok":
            keep.append(i)
            vectors.append(np.asarray(row["features"], dtype=np.float32))
        else:
            errors.append(f"{item.relpath}: {row['error'] if row else 'missing'}")
    return keep, torch.from_numpy(np.stack(vectors)) if vectors else torch.empty(0), errors


def _split_groups(data, pattern: str) -> list[str]:
    """Each item's group for the held-out split: the pattern's match on its relative path (its
    first group if it has one); items that do not match are groups of their own."""
    import re

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


def _load_backbone(model_spec, pretrained, device):
    from visbatch.core.models import load_model

    return load_model(model_spec, pretrained, device, "fp32" if device == "cpu" else "auto")


@app.command("train")
def train(
    root: Optional[str] = typer.Argument(None, help="Labelled root: 0_real/ and 1_fake/ (optionally per generator)."),
    real: Optional[List[str]] = typer.Option(None, "--real", help="Folder of real images (repeatable)."),
    fake: Optional[List[str]] = typer.Option(None, "--fake", help="Folder of generated images (repeatable)."),
    features: str = typer.Option("npr,bitplane,spectrum,layers", "--features",
                                 help="Comma-separated groups: embedding, layers, npr, bitplane, spectrum."),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", help="Backbone of the embedding group.",
                              envvar="VISBATCH_MODEL"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", envvar="VISBATCH_PRETRAINED"),
    univfd_head: Optional[str] = typer.Option(None, "--univfd-head", help="Use UnivFD's released linear head "
                                              "(weight [1, 768], bias) instead of training (--model ViT-L-14 "
                                              "--pretrained openai)."),
    policy: str = typer.Option("crop", "--policy", help="crop (native resolution, default), resize, or tiles "
                               "(--tiles x --tiles native-resolution tiles of --size, features averaged)."),
    size: int = typer.Option(256, "--size", min=32, help="Side of the crop (or tile) the detector looks at."),
    tiles: int = typer.Option(3, "--tiles", min=1, max=16, help="With --policy tiles: tiles per side."),
    holdout: float = typer.Option(0.25, "--holdout", min=0.05, max=0.9, help="Share held out for calibration."),
    seed: int = typer.Option(0, "--seed"),
    group_pattern: Optional[str] = typer.Option(
        None, "--group-pattern", help="Regex on each image's relative path; images with the same match (its "
        "first group if it has one) stay on one side of the held-out split, e.g. '(.*)_\\d+\\.jpg$' for crops "
        "of one photo."),
    l2: float = typer.Option(1e-2, "--l2", min=0.0, help="L2 regularisation of the logistic regression."),
    normalize_format: bool = NormalizeFormatOpt,
    output: str = typer.Option("detector.safetensors", "--output", "-o"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a calibrated detector from labelled folders and write it as safetensors + JSON metadata."""
    from visbatch.core.tasks.aigi.detector import (
        ARTEFACT_GROUPS, BACKBONE_GROUPS, FEATURE_GROUPS, POLICIES, FeatureExtractor, Tiling, format_confounds,
        policy_geometry, read_labelled_folders, read_labelled_root, train_detector, univfd_detector,
    )

    def job() -> int:
        if not output.endswith(".safetensors"):
            raise UsageError("-o must name a .safetensors file")
        if os.path.exists(output) and not overwrite:
            raise UsageError(f"output {output} exists; pass --overwrite to replace it")
        if univfd_head:
            backbone = _load_backbone(model, pretrained, device)
            univfd_detector(univfd_head, backbone).save(output)
            _say(quiet, f"visbatch detect-aigi: UnivFD head saved as {output}")
            return EXIT_OK
        groups = tuple(g.strip() for g in features.split(",") if g.strip())
        unknown = [g for g in groups if g not in FEATURE_GROUPS]
        if not groups or unknown:
            raise UsageError(f"--features: unknown {unknown} (choose from {', '.join(FEATURE_GROUPS)})")
        if policy not in POLICIES:
            raise UsageError("--policy must be crop, resize or tiles")
        if root and (real or fake):
            raise UsageError("give a labelled ROOT or --real/--fake, not both")
        if not root and not (real and fake):
            raise UsageError("give a labelled ROOT (0_real/, 1_fake/) or both --real and --fake")
        data = read_labelled_root(root) if root else read_labelled_folders(real or [], fake or [])
        for warning in format_confounds(data):
            _say(quiet, f"visbatch: warning: {warning}")
        if policy == "resize" and any(g in ARTEFACT_GROUPS for g in groups):
            _say(quiet, "visbatch: warning: --policy resize resamples every image, which erases the up-sampling "
                        "traces the npr, bitplane and spectrum groups look for")
        backbone = _load_backbone(model, pretrained, device) if any(g in BACKBONE_GROUPS for g in groups) else None
        host = backbone or _load_backbone("test-tiny-cnn", None, device)  # only carries device and dtype
        tile_count = tiles if policy == "tiles" else 1
        extractor = FeatureExtractor(backbone, groups, tiling=Tiling(size, tile_count) if policy == "tiles" else None)
        geometry = policy_geometry(policy, size, tile_count)
        keep, vectors, errors = _features_for(data, extractor, geometry, normalize_format, host,
                                              output[: -len(".safetensors")] + ".features.parquet", batch_size,
                                              workers, quiet)
        for error in errors[:5]:
            _say(quiet, f"visbatch: warning: not used: {error}")
        kept = type(data)([data.items[i] for i in keep], [data.labels[i] for i in keep],
                          [data.generators[i] for i in keep])
        names = extractor.names()
        if len(names) != vectors.shape[1]:
            raise RuntimeError(f"{vectors.shape[1]} features but {len(names)} names")
        split_groups = _split_groups(kept, group_pattern) if group_pattern else None
        detector, report = train_detector(vectors, kept, groups, names, policy, size,
                                          backbone.describe() if backbone else None, holdout, seed, l2,
                                          tiles=tile_count, split_groups=split_groups)
        detector.training["normalize_format"] = normalize_format
        detector.training["unreadable"] = len(errors)
        detector.save(output)
        if as_json:
            print(json.dumps(report))
        _say(quiet, f"visbatch detect-aigi train: {len(keep)} images ({sum(kept.labels)} fake), "
                    f"held-out AP {report['held_out_ap']:.3f}, AUROC {report['held_out_auroc']:.3f}, "
                    f"ECE {report['held_out_ece']:.3f}, threshold {report['threshold']:.3f}\n  detector: {output}")
        return EXIT_OK

    raise typer.Exit(guarded(job))


@job_command(default_model="detector")
def score(
    common,
    detector: str = typer.Option(..., "--detector", help="A detector file from `detect-aigi train`."),
    tta: bool = typer.Option(False, "--tta", help="Also score a JPEG q90 and a 0.9x resized copy; "
                             "label 'unsure' when the verdict flips."),
    heatmaps: Optional[str] = typer.Option(None, "--heatmaps", help="Folder for per-patch p_fake overlays."),
    overlay_size: OverlaySizeOpt = 512,
    colormap: ColormapOpt = "inferno",
    alpha: AlphaOpt = 0.5,
    overlay_style: OverlayStyleOpt = "blend",
):
    """Score images: calibrated p_fake, a label, each feature group's share; heatmaps per patch."""
    from visbatch.core.pipeline import run_pipeline
    from visbatch.core.tasks.aigi.detector import Detector, FeatureExtractor, ScoreTask

    def job() -> int:
        loaded = Detector.load(detector)
        items = find_inputs(common)
        backbone = _backbone_for(loaded, common)
        host = backbone or _load_backbone("test-tiny-cnn", None, common.device)
        extractor = FeatureExtractor(backbone, loaded.groups, loaded.raw_embedding, tiling=loaded.tiling())
        task = ScoreTask(loaded, extractor, tta=tta, heatmaps=bool(heatmaps))
        settings = overlay_settings(heatmaps, overlay_size, colormap, alpha, overlay_style)
        summary = run_pipeline(task, host, items, pipeline_config(common, "detect-aigi", host, **settings))
        return finish(summary, common)

    raise typer.Exit(guarded(job))


def _backbone_for(detector, common):
    from visbatch.core.tasks.aigi.detector import BACKBONE_GROUPS

    if not any(group in BACKBONE_GROUPS for group in detector.groups):
        return None
    spec = detector.backbone["spec"] if common.model == "detector" else common.model
    pretrained = common.pretrained if common.pretrained is not None else (
        detector.backbone.get("pretrained") if common.model == "detector" else None)
    backbone = _load_backbone(spec, pretrained, common.device)
    detector.check_backbone(backbone)
    return backbone


@app.command("eval")
def evaluate_command(
    root: str = typer.Argument(..., help="Labelled root: 0_real/ and 1_fake/, optionally per generator."),
    detector: str = typer.Option(..., "--detector"),
    model: str = typer.Option("detector", "--model", "-m", help="Backbone (default: the detector's)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained"),
    min_ap: Optional[float] = typer.Option(None, "--min-ap", help="Exit 1 when the overall AP is below this."),
    normalize_format: bool = NormalizeFormatOpt,
    output: str = typer.Option("detect-aigi-eval.parquet", "--output", "-o"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Per generator and overall AP, AUROC and accuracies of a detector on a labelled root."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from visbatch.cli.common import CommonOptions
    from visbatch.core.outputs import atomic_write_bytes
    from visbatch.core.tasks.aigi.detector import (
        Detector, FeatureExtractor, evaluate, format_confounds, policy_geometry, read_labelled_root,
    )

    def job() -> int:
        if os.path.exists(output) and not overwrite:
            raise UsageError(f"output {output} exists; pass --overwrite to replace it")
        loaded = Detector.load(detector)
        data = read_labelled_root(root)
        for warning in format_confounds(data):
            _say(quiet, f"visbatch: warning: {warning}")
        common = CommonOptions(inputs=[], manifest=None, model=model, pretrained=pretrained, device=device,
                               precision="auto", batch_size=batch_size, workers=workers, recursive=True, glob=[],
                               limit=None, shard=None, max_pixels=89_478_485, resume=False, overwrite=True,
                               fail_on_error=False, json=as_json, quiet=quiet, output=output)
        backbone = _backbone_for(loaded, common)
        host = backbone or _load_backbone("test-tiny-cnn", None, device)
        extractor = FeatureExtractor(backbone, loaded.groups, loaded.raw_embedding, tiling=loaded.tiling())
        keep, vectors, errors = _features_for(data, extractor, policy_geometry(loaded.policy, loaded.size, loaded.tiles),
                                              normalize_format, host, output + ".features.parquet", batch_size,
                                              workers, True)
        p_fake = loaded.probability(vectors) if len(keep) else torch.empty(0)
        rows = evaluate([data.labels[i] for i in keep], [data.generators[i] for i in keep], p_fake,
                        loaded.threshold)
        import io

        buffer = io.BytesIO()
        table = pa.Table.from_pylist(rows).replace_schema_metadata({b"visbatch": json.dumps({
            "detector": detector, "root": os.path.abspath(root), "threshold": loaded.threshold,
            "unreadable": len(errors), "normalize_format": normalize_format}).encode()})
        pq.write_table(table, buffer)
        atomic_write_bytes(output, buffer.getvalue())
        os.remove(output + ".features.parquet")
        overall = rows[-1]
        if as_json:
            print(json.dumps({"rows": rows, "unreadable": len(errors)}))
        if not quiet:
            header = f"{'generator':20s} {'n_real':>6s} {'n_fake':>6s} {'AP':>6s} {'AUROC':>6s} {'acc@.5':>7s} " \
                     f"{'acc@thr':>7s} {'real':>6s} {'fake':>6s}"
            print(header, file=sys.stderr)
            for r in rows:
                print(f"{r['generator'][:20]:20s} {r['n_real']:6d} {r['n_fake']:6d} {r['ap']:6.3f} {r['auroc']:6.3f} "
                      f"{r['acc_at_0_5']:7.3f} {r['acc_at_threshold']:7.3f} {r['real_acc']:6.3f} "
                      f"{r['fake_acc']:6.3f}", file=sys.stderr)
            for error in errors[:5]:
                print(f"visbatch: warning: not scored: {error}", file=sys.stderr)
        if min_ap is not None and not overall["ap"] >= min_ap:
            _say(quiet, f"visbatch: AP {overall['ap']:.3f} is below --min-ap {min_ap}")
            return EXIT_SOME_FAILED
        return EXIT_OK

    raise typer.Exit(guarded(job))


app.command("score")(score)
