"""The loop every subcommand shares.

    items -> DataLoader workers (decode, resize/crop; uint8 + records)
          -> device (pinned, non_blocking) -> task.map (batched model work)
          -> ResultsWriter (one row per input, every batch durable)
          -> OverlayWriter (PNG encodes in background threads)

A task is any object with the :class:`Task` methods. Its ``map`` is a plain
function of a batch (uint8 images on the device + records in, rows and
optional overlay pictures out) holding no global state, so the same map can
run under another distributor (a job array with ``--shard``, Ray Data).

Contracts kept here, whatever the task: one row per input in sorted path
order for any worker count; decode failures become error rows; SIGINT and
SIGTERM stop taking batches, keep what is written and leave the output
resumable; a CUDA out-of-memory error on a batch retries it in halves.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch

from visbatch.core.images import (
    DEFAULT_MAX_PIXELS,
    Batch,
    ImageDataset,
    ImageItem,
    Record,
    collate,
    crop_box,
)
from visbatch.core.models import LoadedModel, dtype_name
from visbatch.core.outputs import OverlayWriter, ResultsWriter, base_row, render_overlay

log = logging.getLogger("visbatch")


@dataclass
class MapOutput:
    """What a task returns for one batch: a row per ok record, in record order."""

    rows: list[dict]
    overlays: list[np.ndarray | None] | None = None  # heatmaps (HxW) per ok record, or None


class Task(Protocol):
    """The interface every subcommand's work implements."""

    name: str

    def fields(self) -> list[pa.Field]:
        """The task's output columns (the base columns are added by the writer)."""

    def options(self) -> dict:
        """Options that change the results, recorded in the output's metadata."""

    def map(self, images: torch.Tensor, records: Sequence[Record]) -> MapOutput:
        """Process one batch: ``images`` are uint8 [B,3,H,W] on the model's device."""

    def summary(self) -> dict:
        """Task-specific figures for the run summary (may be empty)."""

    # Optional: ``annotate``, a picklable callable(ImageItem) -> dict run in the
    # decode workers; its dict lands in ``Record.extra`` (sidecar captions,
    # file fingerprints).
    # Optional: ``geometry``, the CPU resize/crop when the task needs another
    # than the model's (detectors that must see pixels at native resolution);
    # overlays and peaks then map through it.
    # Optional: ``reduce(table) -> table``, the reduce stage over everything
    # gathered (all rows of the run, resumed ones included), run once after
    # the map stage; it keeps one row per input and may fill columns that
    # need the whole pool (ranks, clusters, selections).


def default_batch_size(device: torch.device) -> int:
    """64 on CUDA; 8 elsewhere, where batches that fit in the CPU caches run fastest."""
    return 64 if device.type == "cuda" else 8


def default_workers(device: torch.device) -> int:
    """Decode processes: up to 8 beside a GPU; on CPU a quarter of the cores.

    On CPU the model's own threads use every core, and decode workers that
    compete with them cost more than they save (measured on 2 cores:
    classify 51 img/s with 0 workers, 41 with 2).
    """
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else cores // 4


@dataclass
class RunConfig:
    output: str
    batch_size: int = 32
    workers: int = 2
    resume: bool = False
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    overlays: str | None = None
    overlay_size: int = 512
    overlay_colormap: str = "turbo"
    overlay_alpha: float = 0.5
    overlay_style: str = "blend"
    overlay_signed: bool = False
    quiet: bool = False
    log_interval: float = 30.0
    command_line: list[str] = field(default_factory=lambda: list(sys.argv))
    roots: list[str] = field(default_factory=list)


@dataclass
class Summary:
    task: str
    inputs: int = 0
    resumed: int = 0
    processed: int = 0
    ok: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    output: str | None = None
    overlays: str | None = None
    interrupted: bool = False
    error_examples: list[str] = field(default_factory=list)
    task_summary: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "task_summary"}
        data.update(self.task_summary)
        return data


# ----------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------


class Progress:
    """tqdm on a terminal; a log line every ``interval`` seconds otherwise (cron, CI)."""

    def __init__(self, total: int, quiet: bool, interval: float, desc: str):
        self.total, self.interval, self.desc = total, interval, desc
        self.ok = self.failed = 0
        self.start = self._last_log = time.monotonic()
        self.bar = None
        self.quiet = quiet
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)

    def update(self, ok: int, failed: int) -> None:
        self.ok += ok
        self.failed += failed
        if self.bar is not None:
            self.bar.update(ok + failed)
            self.bar.set_postfix(ok=self.ok, failed=self.failed, refresh=False)
        elif not self.quiet and time.monotonic() - self._last_log >= self.interval:
            self._last_log = time.monotonic()
            self._log_line()

    def _log_line(self) -> None:
        done = self.ok + self.failed
        rate = done / max(time.monotonic() - self.start, 1e-9)
        print(
            f"[visbatch {self.desc}] {done}/{self.total} images, {rate:.1f} img/s, "
            f"ok {self.ok}, failed {self.failed}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes the batch in hand and stops."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[visbatch] {signal.Signals(signum).name}: finishing the batch in hand, then stopping "
              "(again to stop at once); the output stays resumable with --resume", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def __bool__(self) -> bool:
        return self.signal is not None


def _worker_init(_worker_id: int) -> None:
    # The main process decides when to stop; a Ctrl-C reaching the workers
    # (same process group) must not kill them mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def make_loader(items: Sequence[ImageItem], model: LoadedModel, config: RunConfig,
                display_size: int | None = None, keep_original: bool = False,
                annotate=None, geometry=None) -> torch.utils.data.DataLoader:
    dataset = ImageDataset(items, geometry or model.preprocess.geometry, config.max_pixels, display_size,
                           keep_original, annotate)
    workers = max(0, int(config.workers))
    # The user chose the worker count; torch's "more workers than cores" advice is noise here.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,  # sorted path order is part of the output contract
        num_workers=workers,
        collate_fn=collate,
        pin_memory=model.device.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def run_metadata(task: Task, model: LoadedModel, config: RunConfig, fields: list[pa.Field]) -> dict:
    from visbatch import core

    return {
        "visbatch_version": core.__version__,
        "task": task.name,
        "task_options": task.options(),
        "command_line": config.command_line,
        "model": model.describe(),
        "preprocessing": model.preprocess.as_dict(),
        "device": str(model.device),
        "precision": dtype_name(model.dtype),
        "torch_version": torch.__version__,
        "roots": config.roots,
        "schema": [f"{f.name}:{f.type}" for f in fields],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "max_pixels": config.max_pixels,
    }


def _map_with_oom_split(task: Task, images: torch.Tensor, records: list[Record]) -> MapOutput:
    """Run the task; on CUDA out-of-memory, retry the batch in two halves."""
    try:
        return task.map(images, records)
    except torch.cuda.OutOfMemoryError:
        if len(records) <= 1:
            raise
        torch.cuda.empty_cache()
        half = len(records) // 2
        first = _map_with_oom_split(task, images[:half], records[:half])
        second = _map_with_oom_split(task, images[half:], records[half:])
        overlays = None
        if first.overlays is not None or second.overlays is not None:
            overlays = (first.overlays or [None] * half) + (second.overlays or [None] * (len(records) - half))
        return MapOutput(first.rows + second.rows, overlays)


def run_pipeline(task: Task, model: LoadedModel, items: Sequence[ImageItem], config: RunConfig) -> Summary:
    """Run ``task`` over ``items`` and write the output. See the module docstring."""
    fields = task.fields()
    roots = config.roots or sorted({it.root for it in items})
    config.roots = roots
    multi_root = len(roots) > 1
    writer = ResultsWriter(config.output, fields, run_metadata(task, model, config, fields),
                           multi_root=multi_root, resume=config.resume, overwrite=config.overwrite)
    summary = Summary(task=task.name, inputs=len(items), output=str(config.output), overlays=config.overlays)
    if config.resume:
        done = writer.done_keys()
        todo = [it for it in items if (it.root, it.relpath) not in done]
        summary.resumed = len(items) - len(todo)
        items = todo
    overlay_writer = OverlayWriter(config.overlays) if config.overlays else None
    loader = make_loader(items, model, config, display_size=config.overlay_size if overlay_writer else None,
                         annotate=getattr(task, "annotate", None), geometry=getattr(task, "geometry", None))
    progress = Progress(len(items), config.quiet, config.log_interval, task.name)
    start = time.monotonic()
    try:
        with StopFlag() as stop:
            for batch in loader:
                _process_batch(task, model, batch, writer, overlay_writer, config, multi_root, summary, progress)
                if stop:
                    summary.interrupted = True
                    break
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        progress.close()
        if overlay_writer is not None:
            overlay_writer.close()
            summary.error_examples.extend(overlay_writer.errors[:5])
    summary.elapsed_s = time.monotonic() - start
    summary.images_per_s = summary.processed / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    summary.task_summary = task.summary()
    if not summary.interrupted:
        writer.finalize(getattr(task, "reduce", None))
        summary.ok, summary.failed = _count_status(config.output)
    return summary


def _process_batch(task, model, batch: Batch, writer: ResultsWriter, overlay_writer, config: RunConfig,
                   multi_root: bool, summary: Summary, progress: Progress) -> None:
    ok_records = batch.ok_records
    output = MapOutput(rows=[])
    if ok_records:
        images = batch.images.to(model.device, non_blocking=True)
        output = _map_with_oom_split(task, images, ok_records)
        if len(output.rows) != len(ok_records):
            raise RuntimeError(f"task {task.name} returned {len(output.rows)} rows for {len(ok_records)} images")
    task_rows = iter(output.rows)
    rows = []
    for record in batch.records:
        row = base_row(record.item, record.status, record.error, record.width, record.height, multi_root)
        if record.status == "ok":
            row.update(next(task_rows))
            if row.get("status") == "error" and len(summary.error_examples) < 5:
                summary.error_examples.append(f"{record.item.relpath}: {row.get('error')}")
        elif len(summary.error_examples) < 5:
            summary.error_examples.append(f"{record.item.relpath}: {record.error}")
        rows.append(row)
    writer.write_rows(rows)
    if overlay_writer is not None and output.overlays is not None:
        for record, heatmap in zip(ok_records, output.overlays):
            if heatmap is None or record.display is None:
                continue
            box = crop_box(record.width, record.height, getattr(task, "geometry", None) or model.preprocess.geometry)
            picture = render_overlay(record.display, heatmap, config.overlay_colormap, config.overlay_alpha,
                                     config.overlay_style, config.overlay_signed, box)
            overlay_writer.submit(record.item, picture)
    failed = sum(1 for r in rows if r["status"] != "ok")
    summary.processed += len(rows)
    summary.failed += failed
    summary.ok += len(rows) - failed
    progress.update(len(rows) - failed, failed)


def _count_status(output: str) -> tuple[int, int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    status = pq.read_table(output, columns=["status"]).column("status")
    ok = pc.sum(pc.equal(status, "ok")).as_py() or 0
    return ok, len(status) - ok


def print_summary(summary: Summary, as_json: bool, quiet: bool) -> None:
    """Human summary on stderr; with ``as_json`` the machine-readable one on stdout."""
    data = summary.as_dict()
    if as_json:
        print(json.dumps(data, default=_json_default), flush=True)
    if quiet:
        return
    state = "interrupted (resume with --resume)" if summary.interrupted else "done"
    lines = [
        f"visbatch {summary.task}: {state}: {summary.ok} ok, {summary.failed} failed"
        + (f", {summary.resumed} already done" if summary.resumed else "")
        + f" of {summary.inputs} images in {summary.elapsed_s:.1f}s ({summary.images_per_s:.1f} img/s)",
    ]
    for key, value in summary.task_summary.items():
        if not isinstance(value, (list, dict)):
            lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if summary.error_examples:
        lines.append("  first errors:")
        lines.extend(f"    {e}" for e in summary.error_examples)
    if summary.output and not summary.interrupted:
        lines.append(f"  results: {summary.output}")
    if summary.overlays:
        lines.append(f"  overlays: {summary.overlays}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
