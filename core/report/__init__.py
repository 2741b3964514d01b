"""``visbatch report``: one self-contained HTML page per run (or several runs side by side).

The page holds everything it shows: thumbnails as JPEG data URIs, plots as inline SVG, the
style inline; it loads nothing from the network, so it opens from a mail attachment or a CI
artifact. Its kind comes from the output's metadata (``task``): :mod:`.sections` has one
builder per kind. Plots are matplotlib (Agg) SVG, the page a Jinja2 template.

Bounded whatever the run's size: counts and histograms use every row, galleries sample at
most ``max_images`` thumbnails in all.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from importlib import resources

import pyarrow.parquet as pq

from visbatch.core import __version__
from visbatch.core.errors import UsageError
from visbatch.core.files import atomic_write_bytes, utc_now
from visbatch.core.report.sections import BUILDERS, Run, Section, saliency_side_by_side
from visbatch.core.report.thumbs import Thumbnails

DEFAULT_MAX_IMAGES = 120


def check_report_extra() -> None:
    """Jinja2 and matplotlib come with ``pip install 'visbatch[report]'``."""
    import importlib.util

    missing = [name for name in ("jinja2", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"visbatch report needs {' and '.join(missing)}: pip install 'visbatch[report]'")


def _major_minor(version: str) -> tuple[int, int]:
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def _open_output(path: str) -> pq.ParquetFile:
    """A visbatch output, local or at a URL (``s3://runs/scores.parquet``, read whole: an
    output's rows are small beside its images)."""
    from visbatch.core.sources.remote import describe, is_url, read_range

    if not is_url(path):
        if not os.path.isfile(path):
            raise UsageError(f"report: no file {path}")
        return pq.ParquetFile(path)
    try:
        data = read_range(path)
    except FileNotFoundError:
        raise UsageError(f"report: no file {path}")
    except Exception as exc:  # an unreachable endpoint, denied credentials: one line
        raise UsageError(f"report: {describe(exc, path)}")
    return pq.ParquetFile(io.BytesIO(data))


def read_run(path: str, thumbs_left: int, per_gallery: int) -> Run:
    """The table and metadata of a visbatch output; UsageError for anything else."""
    try:
        parquet = _open_output(path)
        raw = (parquet.schema_arrow.metadata or {}).get(b"visbatch")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"report: {path} is not a Parquet file ({str(exc).splitlines()[0]})")
    try:
        metadata = json.loads(raw) if raw else {}
    except ValueError:
        metadata = {}
    if not isinstance(metadata, dict) or not metadata.get("task"):
        raise UsageError(f"report: {path} was not written by visbatch (no visbatch metadata)")
    if not isinstance(metadata["task"], str):
        raise UsageError(
            f"report: {path} has visbatch metadata whose task is not a name; it was not written by visbatch"
        )
    if metadata["task"] not in BUILDERS:
        raise UsageError(f"report: {path} is a {metadata['task']!r} output, which this version cannot show")
    written = metadata.get("visbatch_version")
    if written and _major_minor(written) > _major_minor(__version__):
        raise UsageError(f"report: {path} was written by visbatch {written}, newer than this {__version__}; upgrade")
    return Run(path, parquet.read(), metadata, Thumbnails(metadata, thumbs_left), per_gallery)


TABLE_UNITS = {"quantize": "layers", "detect-aigi-eval": "generators"}  # outputs whose rows are not images


def header(run: Run) -> dict:
    meta = run.metadata
    status = run.column("status")
    counts = Counter(status)
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    if status:
        for path, state, error in zip(run.column("path"), status, run.column("error")):
            if state != "ok" and error:
                reason = re.sub(r"\d+", "N", error.split(":")[0])[:80]
                errors[reason] += 1
                examples.setdefault(reason, f"{path}: {error}")
    model = meta.get("model") or {}
    engine = meta.get("engine") or {}
    return {
        "task": meta.get("task"),
        "path": run.path,
        "command": " ".join(meta.get("command_line") or []) or "-",
        "model": (model.get("spec") or model.get("note") or "-") if isinstance(model, dict) else str(model),
        "checksum": (model.get("checksum") or "")[:16] if isinstance(model, dict) else "",
        "device": meta.get("device", "-"),
        "precision": meta.get("precision", "-"),
        # An output written before engines were recorded says nothing of where it ran.
        "engine": (engine.get("engine") or "-") + "".join(f", {k} {v}" for k, v in engine.items() if k != "engine"),
        # Rows of images carry a status; a layer table (quantize) or a generator table (eval) does not.
        "per_image": bool(status),
        "unit": "rows" if status else TABLE_UNITS.get(meta.get("task"), "rows"),
        "rows": run.table.num_rows,
        "ok": counts.get("ok", run.table.num_rows if not status else 0),
        "failed": sum(n for s, n in counts.items() if s != "ok"),
        "errors": [{"reason": r, "count": n, "example": examples[r]} for r, n in errors.most_common(8)],
        "started": meta.get("started_at", "-"),
        "finished": meta.get("finished_at", "-"),
        "version": meta.get("visbatch_version", "-"),
    }


def report_inputs(path: str) -> list[str]:
    """What a report of ``path`` reads besides it: the run's input roots and its overlay and map
    folders (thumbnails), as its metadata records them ([] for anything unreadable)."""
    try:
        meta = json.loads((_open_output(path).schema_arrow.metadata or {}).get(b"visbatch") or b"{}")
    except Exception:
        return []
    if not isinstance(meta, dict):
        return []
    roots = meta.get("roots")
    found = [*(roots if isinstance(roots, list) else []), meta.get("overlays"), meta.get("maps")]
    return [p for p in found if isinstance(p, str) and p]


def build_report(paths: list[str], output: str, max_images: int = DEFAULT_MAX_IMAGES) -> dict:
    """Write the report of ``paths`` to ``output`` (atomic); returns what it holds."""
    import jinja2

    if not paths:
        raise UsageError("report: give at least one visbatch output")
    if max_images < 0:
        raise UsageError("--max-images must be >= 0")
    # --max-images 0: a page of figures and tables, no galleries at all.
    per_gallery = 0 if max_images == 0 else max(1, min(12, max_images // max(1, 6 * len(paths))))
    share = max_images // len(paths)
    runs = [read_run(path, share, per_gallery) for path in paths]
    pages = []
    for run in runs:
        sections: list[Section] = BUILDERS[run.metadata["task"]](run)
        pages.append({"header": header(run), "sections": sections})
    extra = []
    if len(runs) > 1 and all(run.metadata["task"] == "saliency" for run in runs):
        extra.append(saliency_side_by_side(runs))
    template = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template), autoescape=True, undefined=jinja2.StrictUndefined
    ).get_template("report.html.j2")
    page = template.render(
        title=", ".join(os.path.basename(p) for p in paths),
        pages=pages,
        extra=extra,
        made=utc_now(),
        version=__version__,
    )
    atomic_write_bytes(output, page.encode("utf-8"))
    images = sum(len(g["cards"]) for p in pages for s in p["sections"] for g in s.galleries)
    return {"output": output, "runs": len(runs), "images": images, "bytes": len(page.encode("utf-8"))}


def _template(name: str) -> str:
    return resources.files("visbatch.core.report").joinpath("templates", name).read_text(encoding="utf-8")


__all__ = ["DEFAULT_MAX_IMAGES", "build_report"]
