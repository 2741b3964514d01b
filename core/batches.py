"""One batch through a task: what every engine runs, so the rows are the same wherever it runs.

``process_batch`` maps a decoded batch, builds its rows (base columns, the task's, a
non-finite value made an error row) and submits its overlays and maps; ``settle`` waits
for those files (a failed write makes its row an error row). The local engine and Ray's
model actors both call these; neither imports the pipeline, which only counts what they
commit.
"""

from __future__ import annotations

import math
import signal
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from visbatch.core.images import Batch, ImageDataset, ImageItem, Record, collate, crop_box
from visbatch.core.outputs import BASE_COLUMNS, base_row
from visbatch.core.overlays import SinkWriteError, render_overlay


@dataclass
class MapOutput:
    """What a task returns for one batch: a row per ok record, in record order."""

    rows: list[dict]
    overlays: list[np.ndarray | None] | None = None  # heatmaps (HxW) per ok record, drawn as --overlays
    arrays: list[np.ndarray | None] | None = None  # raw maps per ok record, saved as .npy (--save-maps)


@dataclass(frozen=True)
class OverlayLook:
    """How overlays are drawn (the run's --colormap, --alpha, --overlay-style, signed maps)."""

    colormap: str
    alpha: float
    style: str
    signed: bool

    @classmethod
    def of(cls, config: Any) -> OverlayLook:
        return cls(config.overlay_colormap, config.overlay_alpha, config.overlay_style, config.overlay_signed)


def _worker_init(_worker_id: int) -> None:
    # The main process decides when to stop; a Ctrl-C reaching the workers
    # (same process group) must not kill them mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def make_loader(
    items: Sequence[ImageItem],
    model: Any,
    config: Any,
    display_size: int | None = None,
    annotate=None,
    geometry=None,
) -> torch.utils.data.DataLoader:
    dataset = ImageDataset(items, geometry or model.preprocess.geometry, config.max_pixels, display_size, annotate)
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


def _map_with_oom_split(task: Any, images: torch.Tensor, records: list[Record]) -> MapOutput:
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
        return MapOutput(
            first.rows + second.rows,
            _join(first.overlays, second.overlays, half, len(records) - half),
            _join(first.arrays, second.arrays, half, len(records) - half),
        )


def _join(a, b, n_a: int, n_b: int):
    if a is None and b is None:
        return None
    return (a or [None] * n_a) + (b or [None] * n_b)


@dataclass
class PendingBatch:
    """A batch's rows, held until its files (overlays, maps) are written."""

    rows: list[dict]
    writes: list[tuple[int, Future]]  # (row index, future of a sink write)


def process_batch(
    task, model, batch: Batch, overlay_sink, map_sink, look: OverlayLook, multi_root: bool
) -> PendingBatch:
    ok_records = batch.ok_records
    output = MapOutput(rows=[])
    if ok_records:
        images = batch.images.to(model.device, non_blocking=True)
        output = _map_with_oom_split(task, images, ok_records)
        if len(output.rows) != len(ok_records):
            raise RuntimeError(f"task {task.name} returned {len(output.rows)} rows for {len(ok_records)} images")
    task_rows = iter(output.rows)
    rows: list[dict] = []
    row_of_record: dict[int, int] = {}
    for record in batch.records:
        row = base_row(
            record.item, record.status, record.error, record.width, record.height, multi_root, record.fingerprint
        )
        if record.status == "ok":
            row.update(next(task_rows))
            if row.get("status") == "ok":
                _check_finite(row)
        row_of_record[id(record)] = len(rows)
        rows.append(row)
    writes = []
    geometry = getattr(task, "geometry", None) or model.preprocess.geometry
    for n, record in enumerate(ok_records):
        index = row_of_record[id(record)]
        if rows[index]["status"] != "ok":
            continue
        heatmap = output.overlays[n] if overlay_sink is not None and output.overlays is not None else None
        if heatmap is not None and record.display is not None:
            picture = render_overlay(
                record.display,
                heatmap,
                look.colormap,
                look.alpha,
                look.style,
                look.signed,
                crop_box(record.width, record.height, geometry),
            )
            writes.append((index, overlay_sink.submit(record.item, picture)))
        array = output.arrays[n] if map_sink is not None and output.arrays is not None else None
        if array is not None:
            writes.append((index, map_sink.submit(record.item, array)))
    return PendingBatch(rows, writes)


def settle(pending: PendingBatch) -> list[dict]:
    """Wait for the batch's files; a row whose file failed becomes an error row."""
    rows = pending.rows
    for index, future in pending.writes:
        try:
            future.result()
        except SinkWriteError as exc:
            _make_error(rows[index], str(exc))
    return rows


def batch_tally(rows: list[dict]) -> tuple[int, int, list[str]]:
    """(ok, failed, up to 5 error examples) of a batch's rows."""
    errors = [f"{row['path']}: {row.get('error')}" for row in rows if row["status"] != "ok"]
    return len(rows) - len(errors), len(errors), errors[:5]


def _make_error(row: dict, reason: str) -> None:
    """An ok row becomes an error row: the reason, and no result values."""
    for key in list(row):
        if key not in BASE_COLUMNS and key != "root":
            row[key] = None
    row["status"], row["error"] = "error", reason


def _check_finite(row: dict) -> None:
    """NaN is never an ok value: a row with a non-finite number becomes an error row naming the column."""
    for key, value in row.items():
        if key in BASE_COLUMNS or value is None:
            continue
        if isinstance(value, float):
            bad = not math.isfinite(value)
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            bad = not bool(np.isfinite(value).all())
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], float):
            bad = not all(math.isfinite(v) for v in value)
        else:
            continue
        if bad:
            _make_error(row, f"non-finite value (NaN or inf) in {key}")
            return


def summary_rows(task, rows: list[dict]) -> list[dict]:
    """The ok rows of a batch, reduced to the columns the task's summary counts."""
    columns = getattr(task, "summary_columns", ())
    if not columns:
        return []
    return [{c: row.get(c) for c in columns} for row in rows if row["status"] == "ok"]


def observe(task, rows: list[dict]) -> None:
    if rows and hasattr(task, "observe"):
        task.observe(rows)
