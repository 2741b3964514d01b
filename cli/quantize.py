"""`visbatch quantize`: int8/int4 weight-only quantization (RTN, AWQ, GPTQ) with a report."""

import json
import random
import sys
from typing import Optional

import typer

from visbatch.cli.common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    UsageError,
    WorkersOpt,
    guarded,
)


def quantize(
    calib: Optional[str] = typer.Option(None, "--calib", help="Folder of calibration images."),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", envvar="VISBATCH_MODEL"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", envvar="VISBATCH_PRETRAINED"),
    bits: int = typer.Option(8, "--bits", help="8 or 4."),
    group_size: str = typer.Option("128", "--group-size", help="32, 64, 128 or channel."),
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
    inspect: Optional[str] = typer.Option(None, "--inspect", help="Print what a quantized file holds and exit."),
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 16,
    workers: WorkersOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Quantize a model's weights to int8/int4, calibrated on images; every subcommand loads the file."""

    def job() -> int:
        import os

        from visbatch.core.files import OutputLock
        from visbatch.core.pipeline import RunConfig, check_creatable, json_safe
        from visbatch.core.protect import ProtectedInputs
        from visbatch.core.sources import SourceOptions, find_images
        from visbatch.core.tasks.quantize import describe_file
        from visbatch.core.tasks.quantize.job import QuantizeOptions, run_quantize, write_report

        if inspect:
            if not os.path.isfile(inspect):
                raise UsageError(f"--inspect: no file {inspect}")
            print(json.dumps(describe_file(inspect), indent=None if as_json else 2))
            return EXIT_OK
        if bits not in (4, 8):
            raise UsageError("--bits must be 8 or 4")
        if method not in ("auto", "rtn", "awq", "gptq"):
            raise UsageError("--method must be auto, rtn, awq or gptq")
        if act_order and (method not in ("gptq", "auto") or group_size != "channel"):
            raise UsageError("--act-order goes with --method gptq (or auto) and --group-size channel")
        if min_cosine is not None and not -1 <= min_cosine <= 1:
            raise UsageError("--min-cosine must be between -1 and 1")
        if towers not in ("visual", "text", "all"):
            raise UsageError("--towers must be visual, text or all")
        if group_size != "channel" and group_size not in ("32", "64", "128", "256"):
            raise UsageError("--group-size must be 32, 64, 128, 256 or channel")
        if not calib:
            raise UsageError("--calib DIR is required (calibration images)")
        if not output or not output.endswith(".safetensors"):
            raise UsageError("-o FILE.safetensors is required")
        if os.path.exists(output) and not overwrite:
            raise UsageError(f"output {output} exists; pass --overwrite to replace it")
        if not os.path.exists(calib):
            raise UsageError(f"--calib {calib}: no such folder")
        items = find_images([calib], SourceOptions())
        if not items:
            raise UsageError(f"no images in --calib {calib}")
        report_path = output[: -len(".safetensors")] + ".report.parquet"
        protected = ProtectedInputs.for_items(items, [calib_prompts, calib_captions, model, pretrained])
        if eval_images:
            if not os.path.exists(eval_images):
                raise UsageError(f"--eval-images {eval_images}: no such folder")
            protected = protected.add(
                roots=[eval_images if os.path.isdir(eval_images) else os.path.dirname(os.path.abspath(eval_images))]
            )
        protected.check_file(output, "output")
        protected.check_file(report_path, "report")
        check_creatable(output, "output")
        if eval_images:
            held_out = find_images([eval_images], SourceOptions())
            if not held_out:
                raise UsageError(f"no images in --eval-images {eval_images}")
            calibration = items[:calib_limit]
        else:
            shuffled = items[:]
            random.Random(0).shuffle(shuffled)
            cut = max(1, len(shuffled) // 4) if len(shuffled) > 1 else 0
            held_out, calibration = shuffled[:cut] or shuffled, (shuffled[cut:] or shuffled)[:calib_limit]
        from visbatch.core.models import load_model

        # Calibration statistics and the search maths run in fp32, whatever the device.
        loaded = load_model(model, pretrained, device, "fp32")
        config = RunConfig(output=output, batch_size=batch_size, workers=workers, quiet=True)
        texts = []
        if calib_prompts:
            try:
                with open(calib_prompts, encoding="utf-8") as f:
                    texts += [line.strip() for line in f if line.strip()]
            except OSError as exc:
                raise UsageError(f"cannot read --calib-prompts {calib_prompts}: {exc.strerror or exc}")
        if calib_captions:
            from visbatch.core.sources import read_table_file

            texts += [str(r["caption"]) for r in read_table_file(calib_captions) if r.get("caption")]
        label_list = [label.strip() for label in (labels or "").split(",") if label.strip()]
        if label_list and "text_embedding" not in loaded.capabilities:
            raise UsageError("--labels measures zero-shot agreement of a CLIP model; classifiers get top1_agreement")
        if texts and "text_embedding" not in loaded.capabilities:
            raise UsageError("--calib-prompts/--calib-captions calibrate a CLIP text tower; this model has none")
        options = QuantizeOptions(
            bits=bits,
            group_size=None if group_size == "channel" else int(group_size),
            method=method,
            towers=towers,
            skip=list(skip or []),
            act_order=act_order,
            awq_clip=awq_clip,
            texts=texts,
            labels=label_list,
        )
        overlap = {os.path.realpath(i.path) for i in held_out} & {os.path.realpath(i.path) for i in calibration}
        if overlap and not quiet:
            print(
                f"visbatch: warning: {len(overlap)} of the {len(held_out)} held-out images also calibrate: the "
                "report's figures (and --method auto's choice with fewer than 2 images) are measured on images "
                "the method saw; give more --calib images or a separate --eval-images",
                file=sys.stderr,
            )
        with OutputLock(output):
            report = run_quantize(loaded, calibration, held_out, output, options, config)
            write_report(report_path, report)
        figures = {k: v for k, v in report.items() if k not in ("layers", "kept")}
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
            lines += [f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in figures.items()]
            lines += [f"  file: {output}", f"  report: {report_path}"]
            print("\n".join(lines), file=sys.stderr)
        if min_cosine is not None and not report["cosine_min"] >= min_cosine:
            if not quiet:
                print(
                    f"visbatch: held-out cosine min {report['cosine_min']:.6f} is below --min-cosine {min_cosine}",
                    file=sys.stderr,
                )
            return EXIT_SOME_FAILED
        return EXIT_OK

    raise typer.Exit(guarded(job, quiet))
