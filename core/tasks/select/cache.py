"""select-data's embedding cache: one normalized embedding per file (and its mirror's), reused
only while the file's size, time and content hash still match; clip-score outputs serve too."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visbatch.core.errors import Interrupted, UsageError
from visbatch.core.files import remove_quietly, utc_now
from visbatch.core.images import ImageItem, display_path, path_bytes
from visbatch.core.models import LoadedModel
from visbatch.core.outputs import (
    ResumeMismatch,
    parts_dir_for,
    read_run_metadata,
    row_key,
    write_parquet,
)
from visbatch.core.pipeline import RunConfig, run_pipeline
from visbatch.core.sources import items_unchanged
from visbatch.core.tasks.clip_score import ClipScoreOptions, ClipScoreTask

EMBEDDING = "image_embedding"
FLIPPED = "image_embedding_flipped"
CACHE_COLUMNS = [
    "path",
    "status",
    "error",
    "width",
    "height",
    "file_size",
    "file_mtime",
    "content_hash",
    "image_embedding",
]


def _key(root: str, relpath: str) -> tuple[str, str]:
    return root, relpath


def read_cache(path: str, model: LoadedModel) -> dict[tuple[str, str], dict]:
    """Rows of an embedding cache (or a clip-score ``--save-embeddings`` output), by (root, path).

    Refuses a cache made with other weights.
    """
    if not path or not os.path.exists(path):
        return {}
    try:
        meta = read_run_metadata(path)
        schema = pq.read_schema(path)
    except Exception as exc:
        raise UsageError(f"--cache {path} is not a readable Parquet file: {str(exc).splitlines()[0]}")
    checksum = (meta.get("model") or {}).get("checksum")
    if checksum and checksum != model.checksum:
        raise UsageError(
            f"embedding cache {path} was made with other weights ({meta['model'].get('spec')}); pass another --cache"
        )
    missing = [c for c in CACHE_COLUMNS if c not in schema.names]
    if missing:
        raise UsageError(
            f"{path} is not an embedding cache (no {', '.join(missing)}); clip-score writes one with --save-embeddings"
        )
    columns = CACHE_COLUMNS + [c for c in ("root", "path_bytes", FLIPPED) if c in schema.names]
    roots = meta.get("roots") or [""]
    return {row_key(row, roots[0]): row for row in read_embedding_rows(path, columns)}


def read_embedding_rows(path: str, columns: list[str] | None = None) -> list[dict]:
    """The rows of a Parquet file, each embedding a float16 NumPy view into one matrix per column.

    A 512-d embedding as a Python list of floats costs about 16 KB; as a view of an fp16
    matrix, 1 KB and a hundred bytes of view: ten million pool images stay within 11 GB.
    """
    # Batch by batch: Parquet decodes a list column through per-value levels, about six times the
    # column's own size at its peak, and a whole-file read would hold that for the whole pool.
    file = pq.ParquetFile(path)
    rows: list[dict] = []
    for batch in file.iter_batches(batch_size=8192, columns=columns):
        table = pa.Table.from_batches([batch])
        names = [c for c in (EMBEDDING, FLIPPED) if c in table.column_names]
        part = table.drop_columns(names).to_pylist()
        for name in names:
            for row, vector in zip(part, embedding_views(table.column(name))):
                row[name] = vector
        rows += part
    return rows


def embedding_views(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """One fp16 row view (or None for a null) per entry of a list<float> column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if n == 0:
        return []
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
        values = array.values.slice(array.offset * dim, n * dim)
        starts = np.arange(n) * dim
    else:
        offsets = array.offsets.to_numpy()
        lengths = np.diff(offsets)
        if lengths.size and (lengths != lengths.max()).any() and array.null_count == 0:
            raise UsageError("embeddings of different lengths in one column")
        dim = int(lengths.max()) if lengths.size else 0
        values = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        starts = offsets[:-1] - offsets[0]
    flat = np.array(values.to_numpy(zero_copy_only=False), dtype=np.float16)  # a copy: the batch is freed
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    return [None if nulls[i] else flat[s : s + dim] for i, s in enumerate(starts.tolist())]


def embedding_array(vectors: Sequence, dim: int) -> pa.Array:
    """A fixed_size_list<float16>[dim] column from fp16 vectors (None: a null), built in one matrix."""
    if dim == 0:  # nothing embedded (every image unreadable): a column of nulls
        return pa.nulls(len(vectors), pa.list_(pa.float16(), 0))
    matrix = np.zeros((len(vectors), dim), dtype=np.float16)
    nulls = np.zeros(len(vectors), dtype=bool)
    for i, vector in enumerate(vectors):
        if vector is None:
            nulls[i] = True
        else:
            matrix[i] = vector
    values = pa.array(matrix.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(nulls))


def cache_write_path(cache_path: str, output: str) -> str:
    """Where the updated cache goes: ``cache_path``, unless that file is another command's output
    (a clip-score table read as a cache), which is never rewritten: then OUTPUT.embeddings.parquet
    (the run plan refuses the run when that is the same file)."""
    return default_cache_path(output) if is_foreign_table(cache_path) else cache_path


def is_foreign_table(path: str) -> bool:
    """An existing visbatch output of another command (read as a cache, only read)."""
    if not os.path.exists(path):
        return False
    try:
        task = read_run_metadata(path).get("task")
    except Exception:
        return False
    return task not in (None, "embedding-cache")


def default_cache_path(output: str) -> str:
    return str(Path(output).with_suffix("")) + ".embeddings.parquet"


def pending_run_path(cache_write: str) -> str:
    """The embedding run's own output beside the cache: its parts outlive an interrupted run, so
    the next run with the same cache goes on from them."""
    return cache_write + ".pending.parquet"


def embed_with_cache(
    items: Sequence[ImageItem],
    model: LoadedModel,
    config: RunConfig,
    cache_path: str,
    cache_write: str,
    mirror: bool = False,
) -> tuple[list[dict], int]:
    """One embedding row per item (cache hits, new embeddings for the rest); writes the cache to
    ``cache_write``.

    A cached row is reused only when its file still has the recorded size, time and content
    hash (and, with ``mirror``, the mirrored image's embedding). Returns (rows in item order,
    number of images embedded in this run). An interrupted embedding raises
    :class:`~visbatch.core.errors.Interrupted` and keeps what it embedded for the next run.
    """
    cached = read_cache(cache_path, model)
    rows: dict[tuple[str, str], dict] = {}
    candidates = {}
    unmirrored = 0
    for item in items:
        row = cached.get(_key(item.root, item.relpath))
        # With mirror-invariant dedup a row also needs the mirrored image's embedding.
        if row is not None and row.get("status") == "ok" and mirror and row.get(FLIPPED) is None:
            unmirrored += 1
        elif row is not None and row.get("status") == "ok":
            candidates[item.path] = (item, row)
    if unmirrored and not config.quiet:
        print(
            f"visbatch: note: {unmirrored} cached embeddings lack the mirrored image's embedding and are "
            "computed again (write the cache with clip-score --save-embeddings --save-mirrored, or "
            "dedup with --no-mirror)",
            file=sys.stderr,
        )
    pairs = list(candidates.values())
    for (item, row), fresh in zip(pairs, items_unchanged(pairs)):
        if fresh:
            rows[_key(item.root, item.relpath)] = row
    todo = [item for item in items if _key(item.root, item.relpath) not in rows]
    if todo:
        pending = pending_run_path(cache_write)
        task = ClipScoreTask(model, ClipScoreOptions(save_embeddings=True, save_flipped=mirror))
        resume = os.path.isdir(parts_dir_for(pending)) or os.path.isfile(pending)
        try:
            summary = run_pipeline(task, model, todo, _embed_config(pending, config, resume))
        except ResumeMismatch:  # the kept embeddings were made with other options: start over
            summary = run_pipeline(task, model, todo, _embed_config(pending, config, False))
        if summary.interrupted:
            raise Interrupted(
                "interrupted while embedding; the embeddings made so far are kept: run the same command again to go on"
            )
        new_meta = read_run_metadata(pending)
        roots = new_meta.get("roots") or [""]
        for row in read_embedding_rows(pending):
            rows[row_key(row, roots[0])] = row
        remove_quietly(pending)  # this run's own file: merged into the cache below
    ordered = [rows[_key(it.root, it.relpath)] for it in items]
    _write_cache(cache_write, cached, ordered, items, model)
    return ordered, len(todo)


def _embed_config(pending: str, config: RunConfig, resume: bool) -> RunConfig:
    return RunConfig(
        output=pending,
        batch_size=config.batch_size,
        workers=config.workers,
        max_pixels=config.max_pixels,
        quiet=config.quiet,
        log_interval=config.log_interval,
        resume=resume,
        overwrite=not resume,
        plan=config.plan,
        engine=config.engine,
    )


def _write_cache(path: str, existing: dict, rows: list[dict], items: Sequence[ImageItem], model: LoadedModel) -> None:
    """The cache's earlier rows (``existing``, as read by :func:`read_cache`) updated with this run's."""
    merged = dict(existing)
    for item, row in zip(items, rows):
        merged[_key(item.root, item.relpath)] = row
    keys = sorted(merged)
    dim = next((len(r[EMBEDDING]) for r in merged.values() if r.get(EMBEDDING) is not None), 0)
    schema = pa.schema(
        [
            pa.field("root", pa.string()),
            pa.field("path", pa.string()),
            pa.field("path_bytes", pa.binary()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("file_size", pa.int64()),
            pa.field("file_mtime", pa.float64()),
            pa.field("content_hash", pa.string()),
            pa.field("image_embedding", pa.list_(pa.float16(), dim)),
            pa.field(FLIPPED, pa.list_(pa.float16(), dim)),
        ]
    )
    plain = [f for f in schema if f.name not in (EMBEDDING, FLIPPED)]
    columns = {f.name: [merged[k].get(f.name) for k in keys] for f in plain}
    columns["root"] = [display_path(k[0]) for k in keys]
    columns["path"] = [display_path(k[1]) for k in keys]
    columns["path_bytes"] = [path_bytes(k[1]) for k in keys]
    arrays = [pa.array(columns[f.name], type=f.type) for f in plain]
    arrays += [embedding_array([merged[k].get(name) for k in keys], dim) for name in (EMBEDDING, FLIPPED)]
    table = pa.Table.from_arrays(arrays, schema=schema)
    meta = {
        "task": "embedding-cache",
        "model": model.describe(),
        "roots": sorted({k[0] for k in keys}),
        "written_at": utc_now(),
    }
    write_parquet(path, table, meta)
