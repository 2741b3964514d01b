"""From the options of ``visbatch quantize`` to the quantized file and its report.

Checks the options, reads the calibration and held-out images (held out of the
calibration when no ``--eval-images`` is given), names both outputs and runs
:func:`~visbatch.core.tasks.quantize.job.run_quantize` through
:func:`visbatch.core.jobs.run_job`. The CLI builds the request and prints the report.

With ``--engine ray`` the calibration and held-out images are read and decoded in
the cluster's CPU tasks; the statistics and searches stay on the driver, because
each block's statistics are taken on the outputs of the blocks already quantized
(a sequential reduce over a few hundred images, not a map).

Calibration always runs in fp32 whatever ``--precision`` the subcommands that
load the file later use: the statistics and the error searches need it, so
``quantize`` takes no ``--precision``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from visbatch.core.engines import EngineOptions
from visbatch.core.errors import UsageError
from visbatch.core.jobs import JobOutput, plan_job, run_job
from visbatch.core.models import load_model
from visbatch.core.pipeline import RunConfig
from visbatch.core.plan import InputSet, RunPlan, as_local, local_path_of
from visbatch.core.sources import SourceOptions, find_images, read_table_file
from visbatch.core.tasks.quantize.job import QuantizeOptions, run_quantize, write_report

METHODS = ("auto", "rtn", "awq", "gptq")
GROUP_SIZES = ("32", "64", "128", "256", "channel")
TOWERS = ("visual", "text", "all")


@dataclass
class QuantizeRequest:
    calib: str | None
    output: str | None
    model: str = "efficientnet-lite0"
    pretrained: str | None = None
    bits: int = 8
    group_size: str = "128"
    method: str = "auto"
    min_cosine: float | None = None
    act_order: bool = False
    awq_clip: bool = True
    towers: str = "visual"
    skip: list[str] = field(default_factory=list)
    eval_images: str | None = None
    calib_limit: int = 256
    calib_prompts: str | None = None
    calib_captions: str | None = None
    labels: str | None = None
    overwrite: bool = False
    device: str = "auto"
    batch_size: int = 16
    workers: int = 0
    engine: EngineOptions | None = None  # --engine ray: the images are decoded on the cluster
    html: str | None = None  # --report: the HTML report, beside the report table


@dataclass
class QuantizeResult:
    report: dict
    report_path: str
    options: QuantizeOptions


def report_path_for(output: str) -> str:
    return output[: -len(".safetensors")] + ".report.parquet"


def check_request(r: QuantizeRequest) -> None:
    """The options alone (before any file is read)."""
    r.output, r.calib, r.eval_images = as_local(r.output), as_local(r.calib), as_local(r.eval_images)
    if r.bits not in (4, 8):
        raise UsageError("--bits must be 8 or 4")
    if r.method not in METHODS:
        raise UsageError("--method must be auto, rtn, awq or gptq")
    if r.act_order and (r.method not in ("gptq", "auto") or r.group_size != "channel"):
        raise UsageError("--act-order goes with --method gptq (or auto) and --group-size channel")
    if r.min_cosine is not None and not -1 <= r.min_cosine <= 1:
        raise UsageError("--min-cosine must be between -1 and 1")
    if r.towers not in TOWERS:
        raise UsageError("--towers must be visual, text or all")
    if r.group_size not in GROUP_SIZES:
        raise UsageError("--group-size must be 32, 64, 128, 256 or channel")
    if not r.calib:
        raise UsageError("--calib DIR is required (calibration images)")
    if not r.output:
        raise UsageError("-o FILE.safetensors is required")
    if local_path_of(r.output) is None:
        raise UsageError(f"-o {r.output}: quantize writes a local file (upload it with your storage's tools)")
    if os.path.isdir(r.output):
        raise UsageError(f"-o {r.output} is a folder; give a .safetensors file path")
    if not r.output.endswith(".safetensors"):
        raise UsageError(f"-o {r.output}: must name a .safetensors file")
    if os.path.exists(r.output) and not r.overwrite:
        raise UsageError(f"output {r.output} exists; pass --overwrite to replace it")
    if not os.path.exists(r.calib):
        raise UsageError(f"--calib {r.calib}: no such folder")
    if r.eval_images and not os.path.exists(r.eval_images):
        raise UsageError(f"--eval-images {r.eval_images}: no such folder")


def _texts(r: QuantizeRequest) -> list[str]:
    texts = []
    if r.calib_prompts:
        try:
            with open(r.calib_prompts, encoding="utf-8") as f:
                texts += [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise UsageError(f"cannot read --calib-prompts {r.calib_prompts}: {exc.strerror or exc}")
    if r.calib_captions:
        texts += [str(row["caption"]) for row in read_table_file(r.calib_captions) if row.get("caption")]
    return texts


def quantize_command(r: QuantizeRequest, warn: Callable[[str], None]) -> QuantizeResult:
    check_request(r)
    assert r.calib is not None and r.output is not None  # checked above
    output = r.output
    plan = RunPlan(InputSet())
    items = find_images([r.calib], SourceOptions(), reads=plan.inputs)
    if not items:
        raise UsageError(f"no images in --calib {r.calib}")
    report_path = report_path_for(output)
    for path in (r.calib_prompts, r.calib_captions, r.model, r.pretrained):
        plan.inputs.add_path(path)
    # The report sits beside the file: --overwrite replaces both, and without it an old
    # report (of another run) is replaced only with the file it belongs to.
    outputs = [JobOutput(output), JobOutput(report_path, "report", replaces="quantize")]
    if r.html:
        outputs.append(JobOutput(r.html, "report"))
    held_out_reads = InputSet()
    if r.eval_images:
        held_out = find_images([r.eval_images], SourceOptions(), reads=held_out_reads)
        plan.inputs.merge(held_out_reads)
    plan_job(plan, outputs, r.overwrite)
    if r.eval_images:
        if not held_out:
            raise UsageError(f"no images in --eval-images {r.eval_images}")
        calibration = items[: r.calib_limit]
    else:
        shuffled = items[:]
        random.Random(0).shuffle(shuffled)
        cut = max(1, len(shuffled) // 4) if len(shuffled) > 1 else 0
        held_out, calibration = shuffled[:cut] or shuffled, (shuffled[cut:] or shuffled)[: r.calib_limit]
    # Calibration statistics and the search maths run in fp32, whatever the device.
    loaded = load_model(r.model, r.pretrained, r.device, "fp32")
    config = RunConfig(output=output, batch_size=r.batch_size, workers=r.workers, quiet=True, engine=r.engine)
    texts = _texts(r)
    label_list = [label.strip() for label in (r.labels or "").split(",") if label.strip()]
    if label_list and "text_embedding" not in loaded.capabilities:
        raise UsageError("--labels measures zero-shot agreement of a CLIP model; classifiers get top1_agreement")
    if texts and "text_embedding" not in loaded.capabilities:
        raise UsageError("--calib-prompts/--calib-captions calibrate a CLIP text tower; this model has none")
    options = QuantizeOptions(
        bits=r.bits,
        group_size=None if r.group_size == "channel" else int(r.group_size),
        method=r.method,
        towers=r.towers,
        skip=list(r.skip),
        act_order=r.act_order,
        awq_clip=r.awq_clip,
        texts=texts,
        labels=label_list,
    )
    overlap = {os.path.realpath(i.path) for i in held_out} & {os.path.realpath(i.path) for i in calibration}
    if overlap:
        warn(
            f"{len(overlap)} of the {len(held_out)} held-out images also calibrate: the "
            "report's figures (and --method auto's choice with fewer than 2 images) are measured on images "
            "the method saw; give more --calib images or a separate --eval-images"
        )

    if loaded.is_random:
        warn(f"{loaded.spec} has random weights: the quantized file and its figures mean nothing")

    def body() -> dict:
        report = run_quantize(loaded, calibration, held_out, output, options, config)
        for example in report["unreadable_examples"]:
            warn(f"not used: {example}")
        if report["unreadable_images"] > len(report["unreadable_examples"]):
            warn(f"... and {report['unreadable_images'] - len(report['unreadable_examples'])} more images not used")
        report["engine"] = {"engine": "ray"} if r.engine is not None and not r.engine.is_local else {"engine": "local"}
        write_report(report_path, report)
        if r.html:
            from visbatch.core.report import build_report

            build_report([report_path], r.html)
        return report

    report = run_job(plan, outputs, r.overwrite, body)
    return QuantizeResult(report, report_path, options)
