"""`visbatch quantize`: int8/int4 weight-only quantization (RTN, AWQ, GPTQ) with a report."""

import json
import sys
from typing import Optional

import typer

from visbatch.cli.common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    BatchSizeOpt,
    ConcurrencyOpt,
    DeviceOpt,
    EngineOpt,
    GpusPerWorkerOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    RayAddressOpt,
    ReportOpt,
    UsageError,
    WorkersOpt,
    guarded,
    parse_engine,
)


def quantize(
    calib: Optional[str] = typer.Option(None, "--calib", help="Folder of calibration images."),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", envvar="VISBATCH_MODEL"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", envvar="VISBATCH_PRETRAINED"),
    bits: int = typer.Option(8, "--bits", help="8 or 4."),
    group_size: str = typer.Option("128", "--group-size", help="32, 64, 128, 256 or channel."),
    method: str = typer.Option(
        "auto",
        "--method",
        help="auto (default: per block, whichever of rtn, awq and gptq "
        "has the lowest error on calibration images held out of the calibration), rtn, "
        "awq or gptq.",
    ),
    min_cosine: Optional[float] = typer.Option(
        None,
        "--min-cosine",
        help="Exit 1 when the held-out cosine min (quantized vs original outputs) is below this (a CI gate).",
    ),
    act_order: bool = typer.Option(
        False, "--act-order", help="gptq: columns by decreasing Hessian diagonal (needs --group-size channel)."
    ),
    awq_clip: bool = typer.Option(
        True,
        "--awq-clip/--no-awq-clip",
        help="awq: search a clipping range per output row and group (not for attention's q/k).",
    ),
    towers: str = typer.Option("visual", "--towers", help="CLIP: visual, text or all."),
    skip: Optional[list[str]] = typer.Option(None, "--skip", help="Layer name pattern to keep (repeatable)."),
    eval_images: Optional[str] = typer.Option(
        None, "--eval-images", help="Held-out images for the report (default: 25% of --calib, held out)."
    ),
    calib_limit: int = typer.Option(256, "--calib-limit", min=1, help="At most this many calibration images."),
    calib_prompts: Optional[str] = typer.Option(
        None, "--calib-prompts", help="Text file, one prompt per line: calibrates a CLIP text tower."
    ),
    calib_captions: Optional[str] = typer.Option(
        None, "--calib-captions", help="Captions table (caption column): calibrates a CLIP text tower."
    ),
    labels: Optional[str] = typer.Option(
        None,
        "--labels",
        help="CLIP: comma-separated zero-shot labels; the report gives label_agreement on the held-out images.",
    ),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The quantized .safetensors file."),
    overwrite: OverwriteOpt = False,
    html_report: ReportOpt = False,
    inspect: Optional[str] = typer.Option(None, "--inspect", help="Print what a quantized file holds and exit."),
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 0,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = "auto",
    gpus_per_worker: GpusPerWorkerOpt = None,
    concurrency: ConcurrencyOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Quantize a model's weights to int8/int4, calibrated on images; every subcommand loads the file."""

    def job() -> int:
        import os

        from visbatch.core.tasks.quantize import describe_file
        from visbatch.core.tasks.quantize.command import QuantizeRequest, quantize_command

        if inspect:
            if not os.path.isfile(inspect):
                raise UsageError(f"--inspect: no file {inspect}")
            print(json.dumps(describe_file(inspect), indent=None if as_json else 2))
            return EXIT_OK
        request = QuantizeRequest(
            calib=calib,
            output=output,
            model=model,
            pretrained=pretrained,
            bits=bits,
            group_size=group_size,
            method=method,
            min_cosine=min_cosine,
            act_order=act_order,
            awq_clip=awq_clip,
            towers=towers,
            skip=list(skip or []),
            eval_images=eval_images,
            calib_limit=calib_limit,
            calib_prompts=calib_prompts,
            calib_captions=calib_captions,
            labels=labels,
            overwrite=overwrite,
            device=device,
            batch_size=batch_size,
            workers=workers,
            engine=parse_engine(engine, ray_address, gpus_per_worker, concurrency),
        )
        html = None
        if html_report:
            from visbatch.core.tasks.quantize.command import check_request, report_path_for

            check_request(request)  # the file's own options first: the report sits beside it
            from visbatch.core.prepare import report_beside

            html = request.html = report_beside(report_path_for(output), overwrite)
        warn = (lambda text: None) if quiet else (lambda text: print(f"visbatch: warning: {text}", file=sys.stderr))
        result = quantize_command(request, warn)
        report, report_path, options = result.report, result.report_path, result.options
        from visbatch.core.pipeline import json_safe

        figures = {k: v for k, v in report.items() if k not in ("layers", "kept")}
        printed = {k: v for k, v in figures.items() if k not in ("unreadable_examples", "engine")}
        if as_json:
            print(json.dumps(json_safe(figures), allow_nan=False))
        if not quiet:
            lines = []
            if report["worse_than_rtn"]:
                lines.append(
                    f"visbatch: warning: on the held-out images, {method} is worse than plain rounding "
                    f"(output MSE {report['output_mse']:.4g} vs RTN {report['rtn_output_mse']:.4g}); "
                    "--method auto keeps RTN where it does better"
                )
            lines.append(
                f"visbatch quantize: {method} int{bits} g{options.group_size or 'channel'}: "
                f"{report['quantized_layers']} layers quantized, {report['kept_layers']} kept"
            )
            lines += [f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in printed.items()]
            lines += [f"  file: {output}", f"  report: {report_path}"]
            print("\n".join(lines), file=sys.stderr)
        if html and not quiet:
            print(f"  report: {html}", file=sys.stderr)
        if min_cosine is not None and not report["cosine_min"] >= min_cosine:
            if not quiet:
                print(
                    f"visbatch: held-out cosine min {report['cosine_min']:.6f} is below --min-cosine {min_cosine}",
                    file=sys.stderr,
                )
            return EXIT_SOME_FAILED
        return EXIT_OK

    raise typer.Exit(guarded(job, quiet))
