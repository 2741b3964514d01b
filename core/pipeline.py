"""The loop every subcommand shares.

    items -> DataLoader workers (decode, resize/crop; uint8 + records)
          -> device (pinned, non_blocking) -> task.map (batched model work)
          -> FolderSinks (overlay PNGs, .npy maps; encoded in background threads)
          -> ResultsWriter (one row per input, every batch durable once its files are)

A task is any object with the :class:`Task` methods. Its ``map`` is a plain
function of a batch (uint8 images on the device + records in, rows and
optional overlay pictures out) holding no global state, so the same map can
run under another distributor (a job array with ``--shard``, Ray Data).

Contracts kept here, whatever the task: nothing is created before every
output has been checked against the inputs and the options (a refused run
leaves no trace); one row per input in sorted path order for any worker
count; decode failures become error rows, and so do rows holding a
non-finite number and rows whose overlay or map could not be written (a
full disk stops the run instead, resumable); a batch's rows are written
once its files are, so a resumed run redoes what was lost; ``--resume``
redoes files that changed and drops rows of files that are gone; SIGINT and
SIGTERM stop taking batches, keep what is written and leave the output
resumable; a CUDA out-of-memory error on a batch retries it in halves.

Over 400 lines on purpose: the one loop every subcommand shares, with its contracts (ordering,
resume, signals, OOM halving) in one place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import pyarrow as pa
import torch

from visbatch.core.batches import MapOutput
from visbatch.core.engines import Committed, EngineOptions, EngineRun, open_engine
from visbatch.core.errors import FatalError
from visbatch.core.files import utc_now
from visbatch.core.images import DEFAULT_MAX_PIXELS, ImageItem, Record
from visbatch.core.models import LoadedModel, dtype_name
from visbatch.core.outputs import (
    OutputError,
    ResultsWriter,
    check_parts_folder,
    output_schema,
    parts_dir_for,
)
from visbatch.core.overlays import FolderSink, npy_bytes
from visbatch.core.plan import RunPlan, active_plan, as_local, local_path_of
from visbatch.core.sinks import RemoteOutputs, check_url_output
from visbatch.core.sources import ItemStream, files_unchanged, is_url, items_unchanged
from visbatch.core.sources.base import hash_algorithm

log = logging.getLogger("visbatch")


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
    # Optional: ``observe(rows)`` with ``summary_columns``: the ok rows of each
    # committed batch (only those columns), from which ``summary()`` counts; the
    # same on every engine (Ray's actors send those columns back), and a batch
    # that never reached the output is never counted.
    # Optional: ``counters() -> dict[str, int]`` and ``add_counters(delta)``: work a
    # task counts inside itself (texts encoded through its cache), which a
    # remote worker's copy sends back as deltas to the driver's.
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
    overlays_option: str = "--overlays"  # how messages name the overlays folder (detect-aigi score: --heatmaps)
    quiet: bool = False
    log_interval: float = 30.0
    command_line: list[str] = field(default_factory=lambda: list(sys.argv))
    roots: list[str] = field(default_factory=list)
    save_maps: str | None = None  # folder for the task's raw maps (.npy)
    # The run plan: what the run reads (its inputs) and may write, checked before anything is
    # created; None: made from the items (and a sub-run of a planned job uses its parent's).
    plan: RunPlan | None = None
    report: str | None = None  # the HTML report written after the run (--report), a path or a URL
    shard: tuple[int, int] | None = None  # recorded in the metadata for `visbatch merge`
    selection: dict | None = None  # how the inputs were chosen (globs, limit), recorded in the metadata
    remote: RemoteOutputs | None = None  # URL outputs staged locally, uploaded when the run completes
    engine: EngineOptions | None = None  # where the map stage runs (None: this process)


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
    overlays_written: int = 0
    interrupted: bool = False
    report: str | None = None  # the HTML report written with --report
    engine: str | None = None  # with --engine ray: which cluster ran it
    changed: int = 0  # resumed rows whose file changed since: redone
    removed: int = 0  # resumed rows whose file is gone (or changed and not in this run): dropped
    error_examples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
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

    def extend(self, count: int) -> None:
        """More items to do (a stream lists them as the run goes)."""
        self.total += count
        if self.bar is not None and count:
            self.bar.total = self.total
            self.bar.refresh()

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
            f"[visbatch {self.desc}] {done}/{self.total} images, {rate:.1f} img/s, ok {self.ok}, failed {self.failed}",
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

    def __init__(self, quiet: bool = False):
        self.signal: int | None = None
        self.quiet = quiet
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
        if not self.quiet:
            print(
                f"\n[visbatch] {signal.Signals(signum).name}: finishing the batch in hand, then stopping "
                "(again to stop at once); the output stays resumable with --resume",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def __bool__(self) -> bool:
        return self.signal is not None


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def run_metadata(task: Task, model: LoadedModel, config: RunConfig, fields: list[pa.Field]) -> dict:
    from visbatch import core

    return {
        "visbatch_version": core.__version__,
        "task": task.name,
        "task_options": task.options(),
        "command_line": config.command_line,
        "model": model.describe(),
        "preprocessing": (
            model.preprocess.as_dict()
            if model.preprocess is not None
            else {"geometry": cast(Any, task).geometry.as_dict()}
        ),
        "device": str(model.device),
        "precision": dtype_name(model.dtype),
        "torch_version": torch.__version__,
        "roots": config.roots,
        "schema": [f"{f.name}:{f.type}" for f in fields],
        "started_at": utc_now(),
        "max_pixels": config.max_pixels,
        "shard": list(config.shard) if config.shard else None,
        # --hash sha256 (absent for the default BLAKE2b, so earlier outputs resume as before)
        "hash": "sha256" if hash_algorithm() == "sha256" else None,
        "selection": config.selection,
        "random_weights": bool(model.is_random),
        "engine": {"engine": "local"},  # --engine ray replaces it with the cluster's size
        # Where the pictures went (a report shows them beside the rows).
        "overlays": os.path.abspath(config.overlays) if config.overlays else None,
        "maps": os.path.abspath(config.save_maps) if config.save_maps else None,
    }


def declare_writes(config: RunConfig, plan: RunPlan) -> None:
    """Every path a pipeline run may write, into its plan: the results (file, parts, lock), the
    overlay and map folders, the report."""
    plan.write_results(config.output)
    plan.write_folder(config.overlays, f"{config.overlays_option} folder")
    plan.write_folder(config.save_maps, "--save-maps folder")
    plan.write_file(config.report, "report")


def plan_of(config: RunConfig, stream: ItemStream | None = None) -> RunPlan:
    """The run's plan, checked: the config's (the CLI's, holding the named files), the active one
    of a job this run is part of, or a new one reading ``stream``'s inputs. Declares this
    run's writes into a plan not yet checked, then checks the outputs and the plan."""
    normalize_outputs(config)
    plan = config.plan or active_plan()
    if plan is None:
        plan = RunPlan()
        if stream is not None:
            if stream.reads is not None:
                plan.inputs.merge(stream.reads)
            else:
                plan.inputs.add_items(stream.head)
                for location in stream.locations:
                    plan.inputs.add_file(location)
    check_output_name(config.output)
    if not plan.checked:
        declare_writes(config, plan)
        plan.check()
    check_outputs(config)
    config.plan = plan
    return plan


def normalize_outputs(config: RunConfig) -> None:
    """File URLs (``file:///abs/x``) as the paths they name, before anything else sees them."""
    config.output = as_local(config.output) or config.output
    config.overlays, config.save_maps, config.report = (
        as_local(config.overlays),
        as_local(config.save_maps),
        as_local(config.report),
    )


def check_output_name(output: str, what: str = "output") -> None:
    """An output names a file: not a folder, not a path or URL ending in '/' (checked first: the
    plan would otherwise speak of the parts folder inside it)."""
    local = local_path_of(os.fspath(output))
    if local is None:
        check_url_output(output, what)
    elif local.endswith(os.sep) or os.path.isdir(local):
        raise OutputError(f"{what} {output} is a folder; give a file path")


def check_outputs(config: RunConfig) -> None:
    """The output checks the plan leaves (exists without --overwrite, a folder, writable),
    before anything is created."""
    output = os.fspath(config.output)
    check_output_name(output)
    if local_path_of(output) is None:
        return  # a URL output: its object is checked when it is staged
    output = local_path_of(output) or output
    if not config.overwrite:
        if not config.resume and os.path.exists(output):
            raise OutputError(f"output {output} exists; pass --overwrite to replace it or --resume to add to it")
        if not config.resume and parts_dir_for(output).exists():
            raise OutputError(
                f"an interrupted run left {parts_dir_for(output)}; pass --resume to finish it "
                "or --overwrite to start over"
            )
    check_parts_folder(parts_dir_for(output))
    for path, what in (
        (output, "output"),
        (config.overlays, f"{config.overlays_option} folder"),
        (config.save_maps, "--save-maps folder"),
    ):
        if path and local_path_of(path) is not None:
            if what != "output":
                check_folder_path(local_path_of(path) or path, what)
            check_creatable(local_path_of(path) or path, what)


def check_folder_path(path: str, what: str) -> None:
    """A folder option names a folder, or a path where one can be made (not an existing file)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {path} exists and is not a folder")


def stage_outputs(config: RunConfig) -> None:
    """URL outputs get their local stand-ins (uploaded whole by :func:`publish`); ``file://``
    ones are their paths. Runs inside the plan, after its check."""
    remote = config.remote or RemoteOutputs()
    config.output = remote.stage_file(config.output, config.resume, config.overwrite) or config.output
    config.overlays = remote.stage_folder(config.overlays)
    config.save_maps = remote.stage_folder(config.save_maps)
    if config.report:
        config.report = remote.stage_file(config.report, overwrite=True)
    config.remote = remote if remote else None


def publish(config: RunConfig, summary: Summary) -> None:
    """Upload the run's URL outputs (staged locally) and report them by their URLs."""
    if config.remote:
        config.remote.publish()
        summary.output = config.remote.url_of(summary.output)
        summary.overlays = config.remote.url_of(summary.overlays)
        summary.report = config.remote.url_of(summary.report)


def check_creatable(path: str | os.PathLike, what: str) -> None:
    """Refuse (exit 3) a path whose nearest existing folder cannot be written, before creating anything."""
    current = os.path.abspath(os.fspath(path))
    if os.path.isdir(current):
        if not os.access(current, os.W_OK | os.X_OK):
            raise FatalError(f"cannot write to {what} {path}: permission denied")
        return
    parent = os.path.dirname(current)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise FatalError(f"cannot create {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FatalError(f"cannot create {what} {path}: {parent} is not writable")


def run_pipeline(task: Task, model: LoadedModel, items: Sequence[ImageItem] | ItemStream, config: RunConfig) -> Summary:
    """Run ``task`` over ``items`` (a list, or a stream listed chunk by chunk) and write the
    output. See the module docstring. Nothing is created before the run plan (what the run
    reads and may write) has been checked, and every write is admitted by it."""
    stream = items if isinstance(items, ItemStream) else ItemStream(items)
    fields = task.fields()
    # The roots the inputs name, before --glob/--shard: every shard of one job has the same columns.
    roots = config.roots or stream.all_roots or stream.roots
    config.roots = roots
    multi_root = len(roots) > 1
    output_schema(fields, multi_root, stream.fields())  # a --keep-columns clash, before anything
    plan = plan_of(config, stream)
    with plan.activated():
        stage_outputs(config)
        summary = _run(task, model, stream, config, fields, multi_root)
        if config.report and not summary.interrupted:
            from visbatch.core.report import build_report

            build_report([summary.output or config.output], config.report)
            summary.report = config.report
        if not summary.interrupted:
            publish(config, summary)
    return summary


def _run(task: Task, model: LoadedModel, stream: ItemStream, config: RunConfig, fields, multi_root: bool) -> Summary:
    roots = config.roots
    summary = Summary(task=task.name, inputs=0, output=str(config.output), overlays=config.overlays)
    if model.is_random:
        summary.warnings.append(f"{model.spec} has random weights: its outputs mean nothing")
    engine = open_engine(config.engine)  # a cluster is joined before any output exists
    summary.engine = engine.said
    metadata = run_metadata(task, model, config, fields)
    writer = ResultsWriter(
        config.output,
        fields,
        metadata,
        multi_root=multi_root,
        source_fields=stream.fields(),
        resume=config.resume,
        overwrite=config.overwrite,
    )
    sinks: list[FolderSink] = []
    try:
        done = writer.done_rows() if config.resume else None
        seen: set[tuple[str, str]] = set()  # the done keys listed by this run
        overlay_sink = FolderSink(config.overlays, "overlay", roots) if config.overlays else None
        map_sink = (
            FolderSink(config.save_maps, "map", roots, suffix=".npy", encode=npy_bytes) if config.save_maps else None
        )
        sinks = [s for s in (overlay_sink, map_sink) if s is not None]
        metadata["engine"] = engine.start(EngineRun(task, model, config, writer, multi_root, overlay_sink, map_sink))
        progress = Progress(0, config.quiet, config.log_interval, task.name)
        start = time.monotonic()
        drawn_by_engine = [0]  # overlays the engine's workers wrote (the driver's sink wrote none of them)

        def commit(batch: Committed) -> None:
            count_batch(batch.ok, batch.failed, batch.errors, summary, progress)
            drawn_by_engine[0] += batch.overlays

        try:
            with StopFlag(config.quiet) as stop:
                for chunk in stream.chunks():
                    offset = summary.inputs
                    summary.inputs += len(chunk)
                    todo = _reconcile_listed(done, chunk, summary, seen) if done is not None else chunk
                    progress.extend(len(todo))
                    if not todo:
                        continue
                    engine.run(todo, offset, commit, lambda: bool(stop))
                    if stop:
                        summary.interrupted = True
                        break
                engine.finish(commit)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            progress.close()
            for sink in sinks:
                sink.close()
        summary.elapsed_s = time.monotonic() - start
        summary.images_per_s = summary.processed / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
        summary.task_summary = task.summary()
        if overlay_sink is not None:
            summary.overlays_written = overlay_sink.written + drawn_by_engine[0]
        if not summary.interrupted:
            drop = _reconcile_unlisted(done, seen, summary) if done is not None else set()
            writer.finalize(getattr(task, "reduce", None), drop)
            summary.ok, summary.failed = _count_status(config.output)
    finally:
        writer.close()
    return summary


def _reconcile_listed(done: dict, chunk: Sequence[ImageItem], summary: Summary, seen: set) -> list[ImageItem]:
    """The items of a resumed run's chunk still to do: not done, or changed since (a done row
    stands when its file still has the recorded size, modification time and content hash)."""
    listed = [it for it in chunk if (it.root, it.relpath) in done]
    unchanged = items_unchanged([(it, done[(it.root, it.relpath)]) for it in listed])
    stands = {(it.root, it.relpath) for it, same in zip(listed, unchanged) if same}
    seen.update((it.root, it.relpath) for it in listed)
    todo = []
    for item in chunk:
        key = (item.root, item.relpath)
        if key in stands:
            summary.resumed += 1
            continue
        if key in done:
            summary.changed += 1  # its new row replaces the old one (the newest row of a key wins)
        todo.append(item)
    return todo


def _reconcile_unlisted(done: dict, seen: set, summary: Summary) -> set[tuple[str, str]]:
    """The keys whose old rows must go: done rows this run did not list. One stands only while
    its local file is unchanged (checked in threads); a sample of a shard, a table or a URL
    that is not listed is gone."""
    unlisted = {key: os.path.join(*key) for key in done if key not in seen}
    local = {key: path for key, path in unlisted.items() if not is_url(key[0]) and os.path.isfile(path)}
    by_path = files_unchanged({path: done[key] for key, path in local.items()})
    drop = {key for key in unlisted if not (key in local and by_path[local[key]])}
    summary.removed += len(drop)
    return drop


def count_batch(ok: int, failed: int, errors: list[str], summary: Summary, progress: Progress) -> None:
    summary.error_examples += errors[: max(0, 5 - len(summary.error_examples))]
    summary.processed += ok + failed
    summary.failed += failed
    summary.ok += ok
    progress.update(ok, failed)


def _count_status(output: str) -> tuple[int, int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    status = pq.read_table(output, columns=["status"]).column("status")
    ok = pc.sum(pc.equal(status, "ok")).as_py() or 0
    return ok, len(status) - ok


def json_safe(value):
    """``value`` with non-finite floats as None and numpy scalars as Python numbers (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def print_summary(summary: Summary, as_json: bool, quiet: bool) -> None:
    """Human summary on stderr; with ``as_json`` the machine-readable one on stdout."""
    data = summary.as_dict()
    if as_json:
        print(json.dumps(json_safe(data), allow_nan=False), flush=True)
    if quiet:
        return
    state = "interrupted (resume with --resume)" if summary.interrupted else "done"
    lines = [f"visbatch: warning: {w}" for w in summary.warnings]
    extra = [f"{summary.resumed} already done"] if summary.resumed else []
    extra += [f"{summary.changed} changed since and redone"] if summary.changed else []
    extra += (
        [f"{summary.removed} earlier rows dropped (their inputs are gone, or this run's selection does not list them)"]
        if summary.removed
        else []
    )
    lines.append(
        f"visbatch {summary.task}: {state}: {summary.ok} ok, {summary.failed} failed"
        + "".join(f", {e}" for e in extra)
        + f" of {summary.inputs} images in {summary.elapsed_s:.1f}s ({summary.images_per_s:.1f} img/s)"
    )
    for key, value in summary.task_summary.items():
        if not isinstance(value, (list, dict)):
            lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if summary.error_examples:
        lines.append("  first errors:")
        lines.extend(f"    {e}" for e in summary.error_examples)
    if summary.engine:
        lines.append(f"  engine: {summary.engine}")
    if summary.output and not summary.interrupted:
        lines.append(f"  results: {summary.output}")
    if summary.overlays:
        lines.append(f"  overlays: {summary.overlays_written} written to {summary.overlays}")
    print("\n".join(lines), file=sys.stderr, flush=True)
