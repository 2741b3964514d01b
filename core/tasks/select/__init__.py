"""select-data: embed a pool (through a cache), then dedup, filter and fill a budget.

Map stage: image embeddings from the engine's pipeline (the clip-score task
with ``save_embeddings``), only for images not already in the embedding
cache. Reduce stage, on the gathered normalized embeddings, in this order,
each recorded per image in the manifest: exact duplicates (content hash),
near duplicates (SemDeDup), the caption filter (CLIP score), the budget
fill (a strategy). A report compares the selection with a random subset of
the same size.

Rooms: :mod:`.cache` (the embedding cache), :mod:`.stages` (the four stages and
the strategy registry), :mod:`.materialize` (copies and links), :mod:`.algorithms`
(k-means, SemDeDup, k-center, ...); this module holds the task and the job.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from visbatch.core.errors import UsageError
from visbatch.core.images import ImageItem, Record, display_path
from visbatch.core.models import LoadedModel
from visbatch.core.outputs import (
    FINGERPRINT_COLUMNS,
    ResultsWriter,
    base_row,
)
from visbatch.core.pipeline import (
    RunConfig,
    Summary,
    check_output_name,
    check_outputs,
    declare_writes,
    normalize_outputs,
    publish,
    run_metadata,
    stage_outputs,
)
from visbatch.core.plan import RunPlan, as_local
from visbatch.core.sources import item_fields
from visbatch.core.tasks.clip_score import clip_score
from visbatch.core.tasks.select.cache import (  # noqa: F401
    FLIPPED,
    cache_write_path,
    default_cache_path,
    embed_with_cache,
    is_foreign_table,
    pending_run_path,
    read_cache,
)
from visbatch.core.tasks.select.materialize import Materialization, materialize, plan_materialize  # noqa: F401
from visbatch.core.tasks.select.stages import (  # noqa: F401
    STRATEGIES,
    BudgetFill,
    Selection,
    SelectOptions,
    Strategy,
    budget_count,
    default_dedup_threshold,
    duplicate_groups,
    parse_budget,
    select,
)
from visbatch.core.texts import TextEncoder, caption_for, read_sidecar_caption


class SelectTask:
    """Carries the manifest's columns and options through the engine's writer and metadata."""

    name = "select-data"

    def __init__(self, options: SelectOptions):
        self.config = options

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("selected", pa.bool_()),
            pa.field("reason", pa.string()),
            pa.field("duplicate_of", pa.string()),
            pa.field("duplicate_group", pa.int32()),
            pa.field("duplicate_similarity", pa.float32()),
            pa.field("nearest_path", pa.string()),
            pa.field("nearest_similarity", pa.float32()),
            pa.field("cluster", pa.int32()),
            pa.field("clip_score", pa.float32()),
            pa.field("rank", pa.int32()),
            pa.field("nearest_reference_distance", pa.float32()),
        ]

    def options(self) -> dict:
        o = self.config
        return {
            "budget": o.budget,
            "strategy": o.strategy,
            "seed": o.seed,
            "clusters": o.clusters,
            "dedup": o.dedup,
            "dedup_threshold": o.dedup_threshold,
            "dedup_keep": o.dedup_keep,
            "mirror": o.mirror,
            "min_clip_score": o.min_clip_score,
            "clip_score_fraction": o.clip_score_fraction,
            "prompt": o.prompt,
            "reference_images": len(o.reference),
        }

    def summary(self) -> dict:
        return {}


def run_select(
    items: Sequence[ImageItem],
    model: LoadedModel,
    options: SelectOptions,
    config: RunConfig,
    before_write=None,
    after_write=None,
    checks=None,
) -> tuple[Summary, Selection]:
    """Embed (through the cache), select, and write the manifest (one row per pool image).

    Every path the run may write (the manifest, its parts and lock, the cache and the embedding
    run beside it, the report, and whatever the caller declared in ``config.plan``: copies,
    links, shards) is checked against every input before anything is created.
    ``before_write(selection)`` runs after the selection and before the manifest is written; it
    may return ``{column: [value per item]}`` of string columns to add to the manifest
    (``--write-shards`` records where each selected sample went). ``after_write(selection)``
    runs once the manifest is written (``--copy-to``); what it returns joins the summary.
    ``checks()`` runs after the plan's check and before anything is created (the caller's own
    refusals: destinations that exist).
    """
    start = time.monotonic()
    if options.dedup_threshold is None:
        options.dedup_threshold = default_dedup_threshold(model)
    normalize_outputs(config)
    options.cache = as_local(options.cache)
    cache_path = options.cache or default_cache_path(config.output)
    cache_write = cache_write_path(cache_path, config.output)
    check_output_name(config.output)
    plan = config.plan or RunPlan()
    if config.plan is None:
        plan.inputs.add_items(items)
    if not plan.checked:
        if is_foreign_table(cache_path):  # another command's output, read as a cache and never rewritten
            plan.inputs.add_file(cache_path)
        plan.inputs.add_items(options.reference)
        plan.write_file(cache_write, "embedding cache" if options.cache is None else "--cache")
        plan.write_results(pending_run_path(cache_write), "embedding run")
        declare_writes(config, plan)
        plan.check()
    check_outputs(config)
    if checks is not None:
        checks()
    config.plan = plan
    with plan.activated():
        stage_outputs(config)
        if is_foreign_table(cache_path) and not config.quiet:
            print(
                f"visbatch: note: {cache_path} is another command's output, read as a cache and left as it is; "
                f"the updated cache goes to {cache_write}",
                file=sys.stderr,
            )
        summary, selection = _select_and_write(items, model, options, config, cache_path, cache_write, before_write)
        summary.elapsed_s = time.monotonic() - start
        summary.images_per_s = len(items) / max(summary.elapsed_s, 1e-9)
        if config.report:
            from visbatch.core.report import build_report

            build_report([summary.output or config.output], config.report)
            summary.report = config.report
        after = after_write(selection) if after_write is not None else None
        if after:
            summary.task_summary.update(after)
        publish(config, summary)
    return summary, selection


def _select_and_write(
    items: Sequence[ImageItem],
    model: LoadedModel,
    options: SelectOptions,
    config: RunConfig,
    cache_path: str,
    cache_write: str,
    before_write,
) -> tuple[Summary, Selection]:
    mirror = options.mirror and options.dedup
    rows, embedded = embed_with_cache(items, model, config, cache_path, cache_write, mirror)
    ok = np.array([r.get("status") == "ok" and r.get("image_embedding") is not None for r in rows])
    embeddings = _matrix(rows, ok, "image_embedding", model.device)
    flipped = _matrix(rows, ok, FLIPPED, model.device) if mirror else None
    clip_scores = _clip_scores(items, embeddings, ok, model, options)
    reference = None
    reference_embedded = 0
    if options.reference:
        ref_rows, reference_embedded = embed_with_cache(options.reference, model, config, cache_write, cache_write)
        ref = [np.asarray(r["image_embedding"], dtype=np.float32) for r in ref_rows if r.get("status") == "ok"]
        if not ref:
            raise UsageError("no reference image could be embedded")
        reference = F.normalize(torch.from_numpy(np.stack(ref)).to(model.device), dim=1)
    selection = select(embeddings, ok, [r.get("content_hash") for r in rows], options, clip_scores, reference, flipped)
    added = (before_write(selection) if before_write is not None else None) or {}
    task = SelectTask(options)
    fields = task.fields() + [pa.field(name, pa.string()) for name in added]
    metadata = run_metadata(task, model, config, fields)
    metadata["selection_report"] = selection.report
    roots = config.roots or sorted({it.root for it in items})
    metadata["roots"] = roots
    multi_root = len(roots) > 1
    writer = ResultsWriter(
        config.output,
        fields,
        metadata,
        multi_root=multi_root,
        source_fields=item_fields(items),
        overwrite=config.overwrite,
    )
    out_rows = []
    assert selection.nearest is not None and selection.nearest_similarity is not None  # select() sets them
    nearest, near_sims = selection.nearest, selection.nearest_similarity
    for i, (item, row) in enumerate(zip(items, rows)):
        dup = selection.duplicate_of[i]
        fingerprint = {k: row.get(k) for k in FINGERPRINT_COLUMNS}
        out = base_row(
            item,
            row.get("status") or "error",
            row.get("error"),
            row.get("width"),
            row.get("height"),
            multi_root,
            fingerprint,
        )
        out.update({name: values[i] for name, values in added.items()})
        out.update(
            {
                "selected": bool(selection.rank[i] >= 0),
                "reason": selection.reason[i],
                "duplicate_of": display_path(items[dup].relpath) if dup >= 0 else None,
                "duplicate_group": int(selection.duplicate_group[i]) if selection.duplicate_group[i] >= 0 else None,
                "duplicate_similarity": None
                if np.isnan(selection.duplicate_similarity[i])
                else float(selection.duplicate_similarity[i]),
                "nearest_path": display_path(items[nearest[i]].relpath) if nearest[i] >= 0 else None,
                "nearest_similarity": None if np.isnan(near_sims[i]) else float(near_sims[i]),
                "cluster": int(selection.cluster[i]) if selection.cluster[i] >= 0 else None,
                "clip_score": None
                if clip_scores is None or not ok[i] or np.isnan(clip_scores[i])
                else float(clip_scores[i]),
                "rank": int(selection.rank[i]) if selection.rank[i] >= 0 else None,
                "nearest_reference_distance": None
                if selection.nearest_reference is None or np.isnan(selection.nearest_reference[i])
                else float(selection.nearest_reference[i]),
            }
        )
        out_rows.append(out)
    try:
        writer.write_rows(out_rows)
        writer.finalize()
    finally:
        writer.close()
    summary = Summary(
        task="select-data",
        inputs=len(items),
        processed=len(items),
        ok=int(ok.sum()),
        failed=int((~ok).sum()),
        output=str(config.output),
    )
    if model.is_random:
        summary.warnings.append(f"{model.spec} has random weights: its embeddings, and so the selection, mean nothing")
    summary.error_examples = [
        f"{display_path(it.relpath)}: {r.get('error')}" for it, r in zip(items, rows) if r.get("status") != "ok"
    ][:5]
    summary.task_summary = {
        **selection.report,
        "embedded": embedded,
        "reference_embedded": reference_embedded,
        "cache": cache_write,
        "dedup_threshold": options.dedup_threshold,
        "duplicate_group_examples": _group_examples(items, selection),
    }
    return summary, selection


def _group_examples(items: Sequence[ImageItem], selection: Selection, limit: int = 5) -> list[dict]:
    """The largest duplicate groups: the kept image, then each copy with its similarity to it."""
    groups: dict[int, list[int]] = {}
    assert selection.duplicate_group is not None  # select() always sets it
    for i, g in enumerate(selection.duplicate_group):
        if g >= 0:
            groups.setdefault(int(g), []).append(i)
    largest = sorted(groups.values(), key=lambda members: (-len(members), members[0]))[:limit]
    examples = []
    for members in largest:
        kept = next(i for i in members if selection.duplicate_of[i] < 0)
        examples.append(
            {
                "kept": display_path(items[kept].relpath),
                "size": len(members),
                "copies": [
                    {
                        "path": display_path(items[i].relpath),
                        "reason": selection.reason[i],
                        "similarity": round(float(selection.duplicate_similarity[i]), 4),
                    }
                    for i in members
                    if i != kept
                ],
            }
        )
    return examples


def _matrix(rows: list[dict], ok: np.ndarray, column: str, device, chunk: int = 65536) -> torch.Tensor:
    """[n, d] normalized embeddings from ``column`` of the ok rows (zeros elsewhere; the rows lose
    the column), held in fp16
    (the pool's embeddings are the reduce's one big allocation: 1 KB per 512-d image; the
    selection maths takes them to fp32 a chunk or a cluster at a time)."""
    dim = next((len(r[column]) for r in rows if r.get(column) is not None), 1)
    matrix = np.zeros((len(rows), dim), dtype=np.float16)
    for i, r in enumerate(rows):
        # Taken out of the row: each batch of the cache's vectors is freed once copied, so the
        # pool is held once, not twice, at the peak.
        vector = r.pop(column, None)
        if ok[i]:
            matrix[i] = vector
    out = torch.from_numpy(matrix).to(device)
    for start in range(0, out.shape[0], chunk):
        out[start : start + chunk] = F.normalize(out[start : start + chunk].float(), dim=1).half()
    return out


def _clip_scores(items, embeddings, ok, model, options) -> np.ndarray | None:
    if options.prompt is None and options.captions is None and not options.sidecar:
        return None
    model.require("text_embedding")
    encoder = TextEncoder(model)
    texts = []
    for item in items:
        record = Record(0, item, extra=read_sidecar_caption(item) if options.sidecar else {})
        text, _ = caption_for(record, options.prompt, options.captions)
        texts.append(text)
    scores = np.full(len(items), np.nan, dtype=np.float32)
    have = [i for i, t in enumerate(texts) if t is not None and ok[i]]
    if have:
        text_embeddings = encoder.encode([texts[i] for i in have])
        chunk = 65536
        for start in range(0, len(have), chunk):
            index = have[start : start + chunk]
            rows = embeddings[torch.tensor(index, device=embeddings.device)]
            values, _ = clip_score(rows, text_embeddings[start : start + chunk])
            scores[index] = values.cpu().numpy()
    return scores
