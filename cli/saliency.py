"""`visbatch saliency`: attribution maps with overlays and faithfulness scores."""

from typing import Optional

import typer

from visbatch.cli.common import (
    AlphaOpt,
    OverlaySizeOpt,
    OverlaysOpt,
    OverlayStyleOpt,
    UsageError,
    find_inputs,
    finish,
    guarded,
    job_command,
    load_model_for,
    overlay_settings,
    pipeline_config,
)


def _print_methods() -> None:
    from visbatch.core.tasks.saliency import METHODS

    for name, spec in METHODS.items():
        needs = f" [needs {', '.join(spec.needs)}]" if spec.needs else ""
        print(f"{name:22s} {spec.description}{needs}")


@job_command(default_model="efficientnet-lite0")
def saliency(
    common,
    method: str = typer.Option(
        "auto", "--method", help="See --list-methods. auto: gradcam for CNNs, attention-relevance for ViTs."
    ),
    list_methods: bool = typer.Option(False, "--list-methods", help="List the methods and exit."),
    target: Optional[str] = typer.Option(
        None, "--target", help="Classifiers: top1 (default), INDEX or CLASS_NAME. CLIP labels: predicted or LABEL."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="CLIP: explain the similarity to this text."),
    labels: Optional[str] = typer.Option(None, "--labels", help="CLIP: zero-shot labels, comma-separated."),
    labels_file: Optional[str] = typer.Option(None, "--labels-file", help="CLIP: zero-shot labels, one per line."),
    template: Optional[list[str]] = typer.Option(None, "--template", help="Label template(s) with {}."),
    captions: Optional[str] = typer.Option(None, "--captions", help="CLIP: per-image captions table."),
    path_column: str = typer.Option("path", "--path-column"),
    caption_column: str = typer.Option("caption", "--caption-column"),
    sidecar: bool = typer.Option(False, "--sidecar", help="CLIP: captions from image.txt / image.json."),
    score: str = typer.Option("cosine", "--score", help="CLIP: explain the cosine or the logit (scale * cosine)."),
    signed: bool = typer.Option(False, "--signed", help="gradient: keep the sign (channel sum) instead of |grad|."),
    smooth: int = typer.Option(0, "--smooth", min=0, help="SmoothGrad over the method with N noisy samples."),
    samples: int = typer.Option(16, "--samples", min=1, help="smoothgrad: noisy samples per image."),
    sigma: float = typer.Option(0.15, "--sigma", min=0.0, help="SmoothGrad noise, fraction of the input range."),
    steps: int = typer.Option(32, "--steps", min=1, help="integrated-gradients: integration steps."),
    ig_rule: str = typer.Option(
        "gausslegendre", "--ig-rule", help="gausslegendre, riemann (trapezoid), riemann-left/right/middle."
    ),
    baseline: str = typer.Option("black", "--baseline", help="integrated-gradients: black, blur, noise or zero."),
    layer: Optional[str] = typer.Option(None, "--layer", help="gradcam: module name instead of the automatic layer."),
    masks: int = typer.Option(1000, "--masks", min=1, help="rise: number of random masks."),
    cells: int = typer.Option(7, "--cells", min=2, help="rise: mask grid cells per side."),
    keep_probability: float = typer.Option(0.5, "--keep-probability", min=0.01, max=1.0, help="rise: p."),
    map_size: int = typer.Option(32, "--map-size", min=1, help="Side of the compact map stored in the table."),
    evaluate: bool = typer.Option(False, "--eval", help="Deletion and insertion AUC (Petsiuk et al. 2018)."),
    eval_steps: Optional[int] = typer.Option(
        None, "--eval-steps", min=2, help="Steps of the deletion/insertion curves (default 16; implies --eval)."
    ),
    eval_deletion: Optional[str] = typer.Option(
        None,
        "--eval-deletion",
        help="What deleted pixels become: blur (default) or black (Petsiuk's original); implies --eval.",
    ),
    save_maps: Optional[str] = typer.Option(None, "--save-maps", help="Folder for full-resolution maps (.npy)."),
    internal_batch_size: Optional[int] = typer.Option(
        None, "--internal-batch-size", min=1, help="Largest forward pass of steps/samples/masks (memory bound)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for noise and masks (per image: independent of batching)."),
    overlays: OverlaysOpt = None,
    overlay_size: OverlaySizeOpt = 512,
    colormap: Optional[str] = typer.Option(None, "--colormap", help="Default turbo (coolwarm for signed maps)."),
    alpha: AlphaOpt = 0.5,
    overlay_style: OverlayStyleOpt = "blend",
):
    """Attribution maps for a class, label, prompt or caption, with overlays and faithfulness scores."""
    if list_methods:
        _print_methods()
        raise typer.Exit(0)
    from visbatch.core.pipeline import run_pipeline
    from visbatch.core.tasks.saliency import METHODS, SaliencyOptions, SaliencyTask
    from visbatch.core.texts import DEFAULT_TEMPLATE, TextTable, check_template

    def job() -> int:
        from visbatch.cli.common import read_labels
        from visbatch.core.tasks.saliency.methods import integration_points
        from visbatch.core.tasks.saliency.task import BASELINES, DELETION_FILLS, MAX_MAP_SIZE

        # Every option is checked before anything is loaded or created, whichever method uses it.
        integration_points(steps, ig_rule)
        # Naming how to evaluate asks for the evaluation: never silently skipped.
        run_eval = evaluate or eval_steps is not None or eval_deletion is not None
        if baseline not in BASELINES:
            raise UsageError(f"--baseline {baseline!r}: choose from {', '.join(BASELINES)}")
        if eval_deletion is not None and eval_deletion not in DELETION_FILLS:
            raise UsageError(f"--eval-deletion {eval_deletion!r}: choose blur or black")
        if map_size > MAX_MAP_SIZE:
            raise UsageError(f"--map-size {map_size}: at most {MAX_MAP_SIZE}")
        if score not in ("cosine", "logit"):
            raise UsageError("--score must be cosine or logit")
        for t in template or []:
            check_template(t)
        items = find_inputs(common, caption_column, stream=True)
        model = load_model_for(common)
        chosen = method
        if chosen == "auto":
            from visbatch.core.models import find_spatial_layer

            chosen = "attention-relevance" if find_spatial_layer(model).kind == "tokens" else "gradcam"
        if chosen not in METHODS:
            raise UsageError(f"unknown --method {chosen!r}; choose from {', '.join(METHODS)}")
        signed_maps = METHODS[chosen].signed or (chosen == "gradient" and signed)
        settings = overlay_settings(
            overlays, overlay_size, colormap or ("coolwarm" if signed_maps else "turbo"), alpha, overlay_style
        )
        settings["overlay_signed"] = signed_maps
        config = pipeline_config(
            common, "saliency", model, items, files=[captions, labels_file], save_maps=save_maps, **settings
        )
        # Each method takes the parameters its registry entry names (METHOD_PARAMETERS), from their options.
        values = {
            "signed": signed,
            "samples": samples,
            "sigma": sigma,
            "steps": steps,
            "rule": ig_rule,
            "baseline": baseline,
            "masks": masks,
            "cells": cells,
            "probability": keep_probability,
        }
        params = {name: values[name] for name in METHODS[chosen].parameters}
        roots = items.roots
        options = SaliencyOptions(
            method=chosen,
            params=params,
            smooth=smooth,
            smooth_sigma=sigma,
            layer=layer,
            target=target,
            prompt=prompt,
            labels=read_labels(labels, labels_file),
            templates=list(template or [DEFAULT_TEMPLATE]),
            captions=TextTable.read(captions, path_column, caption_column, roots) if captions else None,
            sidecar=sidecar,
            score=score,
            map_size=map_size,
            evaluate=run_eval,
            eval_steps=16 if eval_steps is None else eval_steps,
            eval_deletion=eval_deletion or "blur",
            save_maps=save_maps,
            internal_batch_size=internal_batch_size or config.batch_size * (4 if model.device.type == "cuda" else 2),
            seed=seed,
        )
        task = SaliencyTask(model, options)
        summary = run_pipeline(task, model, items, config)
        return finish(summary, common)

    raise typer.Exit(guarded(job, common.quiet))
