"""Run preparation: from what a user asked for to checked inputs, a run plan and a RunConfig.

The CLI parses options into :class:`InputSettings` and :class:`OutputSettings` and calls
these; a library user calling them gets the same guarantees: inputs found and checked
(an empty pool, ``--image-column`` without a table, a ``--keep-columns`` clash are refused
before anything runs), every file the run reads in its plan's inputs, and a report path
refused if it exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from visbatch.core.engines import EngineOptions
from visbatch.core.errors import UsageError
from visbatch.core.images import DEFAULT_MAX_PIXELS
from visbatch.core.plan import InputSet, RunPlan, local_path_of
from visbatch.core.sources import (
    ItemStream,
    SourceOptions,
    find_image_stream,
    find_images,
    parse_shard,
)
from visbatch.core.sources.base import InputError


@dataclass
class InputSettings:
    """What to read: INPUT arguments, --manifest, and the options that filter and shape them."""

    inputs: Sequence[str] = ()
    manifest: str | None = None
    recursive: bool = True
    globs: Sequence[str] = ()
    limit: int | None = None
    shard: str | None = None  # "I/N"
    image_column: str | None = None
    keep_columns: str | None = None  # comma-separated
    caption_column: str | None = None  # the command's --caption-column, read from INPUT tables
    warnings: list[str] = field(default_factory=list)  # what the listing skipped, for the summary

    def source_options(self) -> SourceOptions:
        keep = [c.strip() for c in (self.keep_columns or "").split(",") if c.strip()]
        if len(set(keep)) != len(keep):
            raise UsageError(f"--keep-columns names a column twice: {self.keep_columns}")
        return SourceOptions(
            recursive=self.recursive,
            globs=self.globs,
            limit=self.limit,
            shard=parse_shard(self.shard) if self.shard else None,
            image_column=self.image_column,
            caption_column=self.caption_column,
            keep_columns=keep,
        )


def find_run_inputs(settings: InputSettings, stream: bool = False) -> tuple[Any, InputSet]:
    """(the items, what reading them reads). ``stream``: an ItemStream whose shards are listed as
    the run reaches them (the per-image subcommands); otherwise a list of every item."""
    if not settings.inputs and not settings.manifest:
        raise UsageError("no input: give image folders or files, - for stdin, or --manifest FILE")
    options = settings.source_options()
    warnings = settings.warnings
    items: Any
    if stream:
        items = find_image_stream(settings.inputs, options, manifest=settings.manifest, warnings=warnings)
        reads = items.reads
    else:
        reads = InputSet()
        items = find_images(settings.inputs, options, manifest=settings.manifest, warnings=warnings, reads=reads)
    listed = items.head if isinstance(items, ItemStream) else items
    tables = any(hasattr(it.ref, "column") for it in listed)
    shards = bool(items.shards) if isinstance(items, ItemStream) else any(it.shard is not None for it in listed)
    if settings.image_column and not tables:
        raise UsageError("--image-column applies to Parquet/Arrow INPUT tables; none was given")
    if options.keep_columns and not (tables or shards):
        raise UsageError(
            "--keep-columns passes through columns of Parquet/Arrow INPUT tables or fields of WebDataset "
            "samples' .json; neither was given"
        )
    clash = [c for c in options.keep_columns if c in ("key", "shard")]
    if shards and clash:
        raise UsageError(f"--keep-columns {clash[0]!r}: visbatch writes each shard sample's {clash[0]} as that column")
    if items.is_empty() if isinstance(items, ItemStream) else not items:
        where = ", ".join(list(settings.inputs) + ([settings.manifest] if settings.manifest else []))
        filtered = settings.globs or settings.shard or settings.limit
        raise InputError(f"no images found in {where}" + (" after --glob/--shard/--limit" if filtered else ""))
    return items, reads


def run_plan(reads: InputSet | None, files: Iterable[str | None] = ()) -> RunPlan:
    """A run plan whose inputs are what the items' sources read (folders walked, files named, the
    files a manifest or table names, shards) and every other file the run reads (the manifest,
    the model's files, caption tables, label files, references)."""
    plan = RunPlan(InputSet())
    if reads is not None:
        plan.inputs.merge(reads)
    for path in files:
        plan.inputs.add_path(path)
    return plan


def report_path_for(output: str) -> str:
    """``--report``'s page beside a result: ``OUTPUT.html`` (the result's extension replaced)."""
    return os.path.splitext(output)[0] + ".html"


def report_beside(output: str, overwrite: bool, resume: bool = False) -> str:
    """--report: OUTPUT.html beside the output (a path or a URL), refused before anything is
    created if it exists without --overwrite or --resume (the plan refuses it over an input)."""
    from visbatch.core.report import check_report_extra

    check_report_extra()
    path = report_path_for(output)
    local = local_path_of(path)
    if local is not None and os.path.exists(local) and not (overwrite or resume):
        raise UsageError(f"report {path} exists; pass --overwrite to replace it")
    return path


def log_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal (``VISBATCH_LOG_INTERVAL``)."""
    text = os.environ.get("VISBATCH_LOG_INTERVAL", "30")
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"VISBATCH_LOG_INTERVAL must be a number of seconds, got {text!r}")
    if not 0 <= value < float("inf"):
        raise UsageError(f"VISBATCH_LOG_INTERVAL must be a number of seconds >= 0, got {text!r}")
    return value


@dataclass
class OutputSettings:
    """Where and how a per-image run writes, and how it runs."""

    output: str | None = None  # default TASK.parquet
    resume: bool = False
    overwrite: bool = False
    report: bool = False
    batch_size: int | None = None
    workers: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # the decompression-bomb guard; 0 or None: no limit
    quiet: bool = False
    engine: EngineOptions | None = None


def prepare_run(
    task_name: str,
    model,
    inputs: InputSettings,
    reads: InputSet,
    out: OutputSettings,
    files: Iterable[str | None] = (),
    **overlay,
):
    """The run's RunConfig with its plan (checked against every input by run_pipeline before
    anything is created). ``reads`` is what :func:`find_run_inputs` returned with the items (the
    folders walked, the files named: without it an output inside an input folder could not be
    refused); ``files``: the other files the run reads."""
    from visbatch.core.pipeline import RunConfig, default_batch_size, default_workers

    if not isinstance(reads, InputSet):
        raise TypeError("prepare_run needs the InputSet find_run_inputs returned with the items")

    output = out.output or f"{task_name}.parquet"
    return RunConfig(
        output=output,
        batch_size=out.batch_size or default_batch_size(model.device),
        workers=out.workers if out.workers is not None else default_workers(model.device),
        resume=out.resume,
        overwrite=out.overwrite,
        max_pixels=out.max_pixels or None,
        quiet=out.quiet,
        log_interval=log_interval(),
        plan=run_plan(reads, files),
        report=report_beside(output, out.overwrite, out.resume) if out.report else None,
        shard=parse_shard(inputs.shard) if inputs.shard else None,
        selection={"globs": list(inputs.globs), "limit": inputs.limit, "recursive": inputs.recursive},
        engine=out.engine,
        **overlay,
    )
