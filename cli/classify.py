"""`visbatch classify`: top-k classes of a classifier, with CAM overlays."""

import typer

from visbatch.cli.common import (
    AlphaOpt,
    ColormapOpt,
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


@job_command(default_model="efficientnet-lite0")
def classify(
    common,
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many classes to report per image."),
    overlays: OverlaysOpt = None,
    overlay_size: OverlaySizeOpt = 512,
    colormap: ColormapOpt = "turbo",
    alpha: AlphaOpt = 0.5,
    overlay_style: OverlayStyleOpt = "blend",
):
    """Label images with a classifier's top-k classes (ImageNet names for efficientnet-lite0).

    With --overlays, each image gets the class activation map of its top class.
    """
    from visbatch.core.pipeline import run_pipeline
    from visbatch.core.tasks.classify import ClassifyTask

    def job() -> int:
        settings = overlay_settings(overlays, overlay_size, colormap, alpha, overlay_style)
        items = find_inputs(common, stream=True)
        model = load_model_for(common)
        task = ClassifyTask(model, top_k=top_k, overlays=bool(overlays))
        if overlays and not task.cam_available:
            raise UsageError(
                f"--overlays draws class activation maps, which need a CNN ending in pooling and a "
                f"linear head; {model.spec} has none (use `visbatch saliency` for its maps)"
            )
        summary = run_pipeline(task, model, items, pipeline_config(common, "classify", model, items, **settings))
        return finish(summary, common)

    raise typer.Exit(guarded(job, common.quiet))
