"""``visbatch merge``: the outputs of one job's ``--shard I/N`` runs, joined into one file.

Each output records its shard (``shard: [I, N]``) and how its inputs were
chosen. Parts merge only if they are one job: same task, columns, weights
and task options; all sharded with the same N and no shard twice; every
shard present (``allow_partial`` merges what is there and says which are
missing). A path present in two parts is refused (shards never overlap).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visbatch.core.files import utc_now
from visbatch.core.outputs import OutputError, describe_differences, read_run_metadata, write_parquet


def merge_outputs(
    parts: list[str],
    output: str,
    overwrite: bool = False,
    allow_partial: bool = False,
    warnings: list[str] | None = None,
) -> int:
    """Merge the Parquet outputs of ``--shard I/N`` runs into ``output`` (atomic); returns the row count.

    Missing shards with ``allow_partial`` are appended to ``warnings``.
    """
    if not parts:
        raise OutputError("merge needs at least one part")
    if os.path.exists(output) and not overwrite:
        raise OutputError(f"output {output} exists; pass --overwrite to replace it")
    metas, tables = [], []
    for part in parts:
        if not os.path.isfile(part):
            raise OutputError(f"part not found: {part}")
        try:
            tables.append(pq.read_table(part))
        except Exception as exc:
            raise OutputError(f"cannot read {part}: {str(exc).splitlines()[0]}")
        meta = read_run_metadata(part)
        if not meta.get("task"):
            raise OutputError(f"{part} was not written by visbatch")
        metas.append(meta)
    _check_one_job(parts, metas, allow_partial, warnings)
    # Every shard of one job has the same columns: the root column is there whenever the job's
    # inputs name several roots (_check_one_job refused parts of other inputs).
    tables = [t.replace_schema_metadata(None) for t in tables]
    schemas = {t.schema for t in tables}
    if len(schemas) > 1:
        names = [set(t.schema.names) for t in tables]
        differ = sorted(set.union(*names) - set.intersection(*names))
        raise OutputError(
            "the parts have different columns"
            + (f" ({', '.join(differ[:4])})" if differ else "")
            + "; were they written by different versions or commands?"
        )
    roots = sorted({r for meta in metas for r in meta.get("roots", [])})
    table = pa.concat_tables(tables)
    keys = ["root", "path", "path_bytes"] if "root" in table.column_names else ["path", "path_bytes"]
    keys = [k for k in keys if k in table.column_names]
    table = table.sort_by([(k, "ascending") for k in keys if k != "path_bytes"])
    key_columns = [table.column(k).to_numpy(zero_copy_only=False) for k in keys]
    same = np.ones(max(table.num_rows - 1, 0), dtype=bool)
    for column in key_columns:
        same &= column[1:] == column[:-1]
    if same.any():
        at = int(np.flatnonzero(same)[0])
        raise OutputError(f"{table.column('path')[at]} appears in two parts (were they shards of different jobs?)")
    meta = {
        **metas[0],
        "roots": roots,
        "rows": table.num_rows,
        "merged_from": [os.path.abspath(p) for p in parts],
        "finished_at": utc_now(),
    }
    shards = [m.get("shard") for m in metas]
    if shards[0] is not None:
        meta["shard"] = None
        meta["merged_shards"] = sorted(s[0] for s in shards)
        meta["shard_count"] = shards[0][1]
    write_parquet(output, table, meta)
    return table.num_rows


def _check_one_job(parts: list[str], metas: list[dict], allow_partial: bool, warnings: list[str] | None) -> None:
    first = metas[0]
    for part, meta in zip(parts[1:], metas[1:]):
        if sorted(meta.get("roots") or []) != sorted(first.get("roots") or []):
            raise OutputError(
                f"{part} read other inputs than {parts[0]} ({', '.join(meta.get('roots') or ['-'])} vs "
                f"{', '.join(first.get('roots') or ['-'])}); only the shards of one job can be merged"
            )
        for key in ("task", "schema"):
            if meta.get(key) != first.get(key):
                raise OutputError(f"{part} differs from {parts[0]} in {key}; only parts of one job can be merged")
        if (meta.get("model") or {}).get("checksum") != (first.get("model") or {}).get("checksum"):
            raise OutputError(f"{part} was made with other weights than {parts[0]}")
        diffs = describe_differences(
            {"task_options": first.get("task_options")}, {"task_options": meta.get("task_options")}
        )
        if diffs:
            raise OutputError(f"{part} was run with other options than {parts[0]} ({'; '.join(diffs[:3])})")
    shards: list[Any] = [m.get("shard") for m in metas]
    sharded = [s is not None for s in shards]
    if any(sharded) and not all(sharded):
        lone = parts[sharded.index(False)]
        raise OutputError(f"{lone} is not a --shard output but other parts are; only the shards of one job merge")
    if not any(sharded):
        if len(parts) > 1:
            raise OutputError(
                "none of the parts is a --shard output; merge joins the shards of one job "
                "(run each part with --shard I/N)"
            )
        return
    counts = {s[1] for s in shards}
    if len(counts) > 1:
        raise OutputError(f"the parts come from different shard counts ({sorted(counts)}); merge the shards of one job")
    count = counts.pop()
    seen: dict[int, str] = {}
    for part, (index, _) in zip(parts, shards):
        if index in seen:
            raise OutputError(f"shard {index}/{count} is given twice ({seen[index]} and {part})")
        seen[index] = part
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        text = f"shards {', '.join(f'{i}/{count}' for i in missing[:10])}{' ...' if len(missing) > 10 else ''} missing"
        if not allow_partial:
            raise OutputError(f"{len(missing)} of {count} {text}; pass --allow-partial to merge the rest")
        if warnings is not None:
            warnings.append(f"merged {len(seen)} of {count} shards: {text}")
