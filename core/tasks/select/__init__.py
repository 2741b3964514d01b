"""select-data: embed a pool (through a cache), then dedup, filter and fill a budget.

Map stage: image embeddings from the engine's pipeline (the clip-score task
with ``save_embeddings``), only for images not already in the embedding
cache. Reduce stage, on the gathered normalized embeddings, in this order,
each recorded per image in the manifest: exact duplicates (content hash),
near duplicates (SemDeDup), the caption filter (CLIP score), the budget
fill (a strategy). A report compares the selection with a random subset of
the same size.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.files import atomic_copy, files_identical, utc_now
from visbatch.core.images import ImageItem, Record, display_path, files_unchanged, path_bytes
from visbatch.core.models import LoadedModel
from visbatch.core.outputs import (
    FINGERPRINT_COLUMNS,
    ResultsWriter,
    base_row,
    read_run_metadata,
    row_key,
    write_parquet,
)
from visbatch.core.overlays import root_folder_names
from visbatch.core.pipeline import RunConfig, Summary, check_outputs, run_metadata, run_pipeline
from visbatch.core.protect import ProtectedInputs
from visbatch.core.tasks.clip_score import (
    ClipScoreOptions,
    ClipScoreTask,
    TextEncoder,
    TextTable,
    caption_for,
    clip_score,
    read_sidecar_caption,
)
from visbatch.core.tasks.select import algorithms as alg

STRATEGIES = ("random", "top-clip-score", "kcenter", "cluster-balanced", "targeted")
FLIPPED = "image_embedding_flipped"
CACHE_COLUMNS = ["path", "status", "error", "width", "height", "file_size", "file_mtime", "content_hash",
                 "image_embedding"]


@dataclass
class SelectOptions:
    budget: float | int | None = None  # float: fraction of the pool; int: a count; None: all eligible
    strategy: str = "random"
    seed: int = 0
    clusters: int | None = None
    dedup: bool = True
    dedup_threshold: float | None = None  # None: default_dedup_threshold(model)
    dedup_keep: str = "centroid"  # centroid | clip-score
    mirror: bool = True  # dedup compares each image with the mirrored copies of the others too
    min_clip_score: float | None = None
    clip_score_fraction: float | None = None
    prompt: str | None = None
    captions: TextTable | None = None
    sidecar: bool = False
    reference: list[ImageItem] = field(default_factory=list)
    cache: str | None = None


class SelectTask:
    """Carries the manifest's columns and options through the engine's writer and metadata."""

    name = "select-data"

    def __init__(self, options: SelectOptions):
        self.config = options

    def fields(self) -> list[pa.Field]:
        return [pa.field("selected", pa.bool_()), pa.field("reason", pa.string()),
                pa.field("duplicate_of", pa.string()), pa.field("duplicate_group", pa.int32()),
                pa.field("duplicate_similarity", pa.float32()), pa.field("cluster", pa.int32()),
                pa.field("clip_score", pa.float32()), pa.field("rank", pa.int32()),
                pa.field("nearest_reference_distance", pa.float32())]

    def options(self) -> dict:
        o = self.config
        return {"budget": o.budget, "strategy": o.strategy, "seed": o.seed, "clusters": o.clusters,
                "dedup": o.dedup, "dedup_threshold": o.dedup_threshold, "dedup_keep": o.dedup_keep,
                "mirror": o.mirror,
                "min_clip_score": o.min_clip_score, "clip_score_fraction": o.clip_score_fraction,
                "prompt": o.prompt, "reference_images": len(o.reference)}

    def summary(self) -> dict:
        return {}


# ----------------------------------------------------------------------------
# Embedding cache
# ----------------------------------------------------------------------------


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
        raise UsageError(f"embedding cache {path} was made with other weights ({meta['model'].get('spec')}); "
                         "pass another --cache")
    missing = [c for c in CACHE_COLUMNS if c not in schema.names]
    if missing:
        raise UsageError(f"{path} is not an embedding cache (no {', '.join(missing)}); clip-score writes one "
                         "with --save-embeddings")
    columns = CACHE_COLUMNS + [c for c in ("root", "path_bytes", FLIPPED) if c in schema.names]
    table = pq.read_table(path, columns=columns).to_pylist()
    roots = meta.get("roots") or [""]
    return {row_key(row, roots[0]): row for row in table}


def embed_with_cache(items: Sequence[ImageItem], model: LoadedModel, config: RunConfig, cache_path: str,
                     mirror: bool = False) -> tuple[list[dict], int]:
    """One embedding row per item (cache hits, new embeddings for the rest); writes the cache.

    A cached row is reused only when its file still has the recorded size, time and content
    hash (and, with ``mirror``, the mirrored image's embedding). Returns (rows in item order,
    number of images embedded in this run).
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
        print(f"visbatch: note: {unmirrored} cached embeddings lack the mirrored image's embedding and are "
              "computed again (write the cache with clip-score --save-embeddings --save-mirrored, or "
              "dedup with --no-mirror)", file=sys.stderr)
    fresh = files_unchanged({path: row for path, (_, row) in candidates.items()})
    for path, (item, row) in candidates.items():
        if fresh[path]:
            rows[_key(item.root, item.relpath)] = row
    todo = [item for item in items if _key(item.root, item.relpath) not in rows]
    if todo:
        with tempfile.TemporaryDirectory(prefix=".visbatch-embed-",
                                         dir=os.path.dirname(os.path.abspath(cache_path)) or ".") as tmp:
            part = os.path.join(tmp, "embeddings.parquet")
            task = ClipScoreTask(model, ClipScoreOptions(save_embeddings=True, save_flipped=mirror))
            embed_config = RunConfig(output=part, batch_size=config.batch_size, workers=config.workers,
                                     max_pixels=config.max_pixels, quiet=config.quiet,
                                     log_interval=config.log_interval)
            run_pipeline(task, model, todo, embed_config)
            new_meta = read_run_metadata(part)
            roots = new_meta.get("roots") or [""]
            for row in pq.read_table(part).to_pylist():
                rows[row_key(row, roots[0])] = row
    ordered = [rows[_key(it.root, it.relpath)] for it in items]
    _write_cache(cache_path, cached, ordered, items, model)
    return ordered, len(todo)


def _write_cache(path: str, existing: dict, rows: list[dict], items: Sequence[ImageItem],
                 model: LoadedModel) -> None:
    """The cache's earlier rows (``existing``, as read by :func:`read_cache`) updated with this run's."""
    merged = dict(existing)
    for item, row in zip(items, rows):
        merged[_key(item.root, item.relpath)] = row
    keys = sorted(merged)
    dim = next((len(r["image_embedding"]) for r in merged.values() if r.get("image_embedding") is not None), 0)
    schema = pa.schema([
        pa.field("root", pa.string()), pa.field("path", pa.string()), pa.field("path_bytes", pa.binary()),
        pa.field("status", pa.string()), pa.field("error", pa.string()), pa.field("width", pa.int32()),
        pa.field("height", pa.int32()), pa.field("file_size", pa.int64()), pa.field("file_mtime", pa.float64()),
        pa.field("content_hash", pa.string()), pa.field("image_embedding", pa.list_(pa.float16(), dim)),
        pa.field(FLIPPED, pa.list_(pa.float16(), dim)),
    ])
    columns = {f.name: [merged[k].get(f.name) for k in keys] for f in schema}
    columns["root"] = [display_path(k[0]) for k in keys]
    columns["path"] = [display_path(k[1]) for k in keys]
    columns["path_bytes"] = [path_bytes(k[1]) for k in keys]
    for name in ("image_embedding", FLIPPED):
        columns[name] = [None if v is None else np.asarray(v, dtype=np.float16) for v in columns[name]]
    table = pa.Table.from_pydict(columns, schema=schema)
    meta = {"task": "embedding-cache", "model": model.describe(), "roots": sorted({k[0] for k in keys}),
            "written_at": utc_now()}
    write_parquet(path, table, meta)


# ----------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------


def default_dedup_threshold(model: LoadedModel) -> float:
    """0.95 for CLIP embeddings (SemDeDup's setting); 0.85 for classifier features.

    Classifier features are pooled after ReLU, all non-negative, and spread
    differently: on efficientnet-lite0, resized, re-compressed (JPEG q30),
    cropped and flipped copies of the committed photos score 0.888 to 1.0
    against their originals while distinct photos score at most 0.264, so
    0.95 would miss half the copies.
    """
    return 0.95 if model.family == "open_clip" else 0.85


def parse_budget(text: str | None) -> float | int | None:
    """``0.3`` (with a point, in (0, 1]) is a fraction of the pool; ``10000`` is a count."""
    if text is None:
        return None
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise UsageError(f"--budget {text!r}: give a fraction like 0.3 or a count like 10000")
    if isinstance(value, float) and not 0 < value <= 1:
        raise UsageError(f"--budget {text}: a fraction must be in (0, 1]")
    if isinstance(value, int) and value < 1:
        raise UsageError(f"--budget {text}: a count must be at least 1")
    return value


def budget_count(budget: float | int | None, pool: int) -> int:
    if budget is None:
        return pool
    return min(pool, int(round(budget * pool)) if isinstance(budget, float) else int(budget))


@dataclass
class Selection:
    reason: list[str]
    duplicate_of: list[int]
    cluster: np.ndarray
    clip_scores: np.ndarray | None
    rank: np.ndarray  # -1 when not selected
    nearest_reference: np.ndarray | None
    report: dict
    duplicate_similarity: np.ndarray | None = None  # each dropped copy's similarity to its kept image
    duplicate_group: np.ndarray | None = None  # a group id per kept image with copies and per copy, else -1


def duplicate_groups(duplicate_of: list[int]) -> np.ndarray:
    """Group ids: each kept image that has copies and its copies share one id (numbered in path
    order of the kept image); images without copies get -1."""
    n = len(duplicate_of)
    heads = sorted({d for d in duplicate_of if d >= 0})
    group_of = {head: g for g, head in enumerate(heads)}
    groups = np.full(n, -1, dtype=np.int64)
    for i, d in enumerate(duplicate_of):
        if d >= 0:
            groups[i] = group_of[d]
        elif i in group_of:
            groups[i] = group_of[i]
    return groups


def select(embeddings: torch.Tensor, ok: np.ndarray, hashes: list, options: SelectOptions,
           clip_scores: np.ndarray | None = None, reference: torch.Tensor | None = None,
           flipped: torch.Tensor | None = None) -> Selection:
    """Run the four stages over the pool (rows in path order). ``ok`` masks images that embedded;
    ``flipped`` are the embeddings of the mirrored images (mirror-invariant dedup)."""
    n = embeddings.shape[0]
    reason = ["kept" if good else "error" for good in ok]
    duplicate_of = [-1] * n
    similarity = np.full(n, np.nan, dtype=np.float32)
    # 1. exact duplicates: the first in path order is kept.
    first_with_hash: dict[str, int] = {}
    for i in range(n):
        if ok[i] and hashes[i]:
            if hashes[i] in first_with_hash:
                reason[i], duplicate_of[i] = "exact_duplicate", first_with_hash[hashes[i]]
                similarity[i] = 1.0
            else:
                first_with_hash[hashes[i]] = i
    alive = np.array([r == "kept" for r in reason])
    index = np.flatnonzero(alive)
    x = _rows(embeddings, index)
    clusters = np.full(n, -1, dtype=np.int64)
    k = options.clusters or alg.default_clusters(max(1, index.size))
    centroids = None
    if index.size:
        labels, centroids = alg.spherical_kmeans(x, k, seed=options.seed)
        clusters[index] = labels.cpu().numpy()
    # 2. near duplicates (SemDeDup) within clusters.
    if options.dedup and index.size > 1:
        if options.dedup_keep == "clip-score":
            if clip_scores is None:
                raise UsageError("--dedup-keep clip-score needs captions (--captions, --sidecar) or --prompt")
            priority = torch.from_numpy(np.nan_to_num(clip_scores[index], nan=-1.0)).float()
        else:
            priority = (x * centroids[torch.from_numpy(clusters[index])]).sum(dim=1).cpu()
        local_labels = torch.from_numpy(clusters[index]).to(x.device)
        dup, sims = alg.semantic_duplicates(x, local_labels, priority.to(x.device), options.dedup_threshold,
                                            flipped=_rows(flipped, index) if flipped is not None else None,
                                            second=alg.second_clusters(x, centroids, local_labels))
        dup, sims = dup.cpu().numpy(), sims.cpu().numpy()
        for local, target in enumerate(dup):
            if target >= 0:
                reason[index[local]], duplicate_of[index[local]] = "near_duplicate", int(index[target])
                similarity[index[local]] = sims[local]
    # Exact copies of an image that is itself a near duplicate belong to the image kept for it.
    for i in range(n):
        parent = duplicate_of[i]
        if parent >= 0 and duplicate_of[parent] >= 0:
            duplicate_of[i] = duplicate_of[parent]
    groups = duplicate_groups(duplicate_of)
    # 3. caption filter.
    eligible = np.array([r == "kept" for r in reason])
    threshold = None
    if options.min_clip_score is not None or options.clip_score_fraction is not None:
        if clip_scores is None:
            raise UsageError("--min-clip-score/--clip-score-fraction need captions (--captions, --sidecar) or --prompt")
        scores = np.nan_to_num(clip_scores, nan=-np.inf)
        if options.clip_score_fraction is not None:
            # DataComp: one global threshold that keeps the given fraction of the candidates.
            threshold = float(np.quantile(scores[eligible], 1 - options.clip_score_fraction)) if eligible.any() else 0
        else:
            threshold = options.min_clip_score
        for i in np.flatnonzero(eligible & (scores < threshold)):
            reason[i] = "low_clip_score"
        eligible = np.array([r == "kept" for r in reason])
    # 4. budget fill.
    candidates = np.flatnonzero(eligible)
    budget = min(budget_count(options.budget, int(ok.sum())), candidates.size)
    pool = _rows(embeddings, candidates)
    nearest_reference = None
    strategy = options.strategy
    if strategy == "random":
        picked = np.random.default_rng(options.seed).permutation(candidates.size)[:budget]
    elif strategy == "top-clip-score":
        if clip_scores is None:
            raise UsageError("--strategy top-clip-score needs captions (--captions, --sidecar) or --prompt")
        picked = np.argsort(-np.nan_to_num(clip_scores[candidates], nan=-np.inf), kind="stable")[:budget]
    elif strategy == "kcenter":
        picked = _kcenter_partitioned(pool, clusters[candidates], budget, options.seed)
    elif strategy == "cluster-balanced":
        picked = alg.cluster_balanced(clusters[candidates], budget, options.seed)
    elif strategy == "targeted":
        if reference is None or reference.shape[0] == 0:
            raise UsageError("--strategy targeted needs --reference DIR")
        chosen, near = alg.targeted_selection(pool, reference, budget)
        picked = chosen.numpy()
        nearest_reference = np.full(n, np.nan, dtype=np.float32)
        nearest_reference[candidates] = near.cpu().numpy()
    else:
        raise UsageError(f"unknown --strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    rank = np.full(n, -1, dtype=np.int64)
    rank[candidates[picked]] = np.arange(len(picked))
    for i in candidates:
        if rank[i] < 0:
            reason[i] = "over_budget"
    report = {"comparison": _report(pool, picked, options, reference, clip_scores, candidates)}
    report.update(pool=int(n), errors=int((~ok).sum()), exact_duplicates=reason.count("exact_duplicate"),
                  near_duplicates=reason.count("near_duplicate"), low_clip_score=reason.count("low_clip_score"),
                  eligible=int(candidates.size), budget=int(budget), selected=int(len(picked)),
                  clusters=int(k), clip_score_threshold=threshold)
    report.update(duplicate_groups=int(groups.max() + 1) if (groups >= 0).any() else 0,
                  largest_duplicate_group=int(np.bincount(groups[groups >= 0]).max()) if (groups >= 0).any() else 0)
    return Selection(reason, duplicate_of, clusters, clip_scores, rank, nearest_reference, report, similarity, groups)


def _rows(embeddings: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``embeddings[index]`` without a copy when the index is every row (a million rows is 2 GB)."""
    if index.size == embeddings.shape[0]:
        return embeddings
    return embeddings[torch.from_numpy(index).to(embeddings.device)]


def _kcenter_partitioned(pool: torch.Tensor, labels: np.ndarray, budget: int, seed: int,
                         exact_limit: int = 200_000_000) -> np.ndarray:
    """Greedy k-center over the candidates; over ``exact_limit`` (budget x pool) it runs within
    each k-means cluster, with the budget shared in proportion to cluster size, to stay near-linear."""
    if budget * pool.shape[0] <= exact_limit or labels.max() <= 0:
        return alg.kcenter_greedy(pool, budget, seed).cpu().numpy()
    clusters = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in clusters])
    picked = []
    for cluster, count in zip(clusters, alg.allocate(budget, sizes)):
        members = np.flatnonzero(labels == cluster)
        if count:
            local = alg.kcenter_greedy(pool[torch.from_numpy(members)], int(count), seed).cpu().numpy()
            picked.append(members[local])
    return np.concatenate(picked) if picked else np.empty(0, dtype=np.int64)


def _report(pool: torch.Tensor, picked: np.ndarray, options: SelectOptions, reference, clip_scores,
            candidates) -> dict:
    """The selection beside a random subset of the same size, on the properties strategies optimize."""
    if pool.shape[0] == 0 or len(picked) == 0:
        return {}
    rng = np.random.default_rng(options.seed + 1)
    random_pick = rng.permutation(pool.shape[0])[: len(picked)]
    out: dict = {}
    for name, chosen in (("selection", picked), ("random", random_pick)):
        subset = pool[torch.from_numpy(np.asarray(chosen, dtype=np.int64))]
        mean_cov, max_cov = alg.coverage(pool, subset, seed=options.seed)
        out[name] = {"coverage_mean": mean_cov, "coverage_max": max_cov, "diversity": alg.diversity(subset)}
        if reference is not None and reference.shape[0]:
            out[name]["reference_mmd"] = alg.mmd(subset, reference)
        if clip_scores is not None:
            out[name]["clip_score_mean"] = float(np.nanmean(clip_scores[candidates][chosen]))
    return out


@dataclass
class Materialization:
    """What ``--copy-to`` / ``--link-to`` will do: (source, destination) pairs to write and the
    destinations that already hold the same file (skipped)."""

    mode: str  # copy | symlink | hardlink
    target: str
    writes: list[tuple[str, Path]]
    same: int


def plan_materialize(items: Sequence[ImageItem], selected: np.ndarray, target: str, mode: str,
                     protected: ProtectedInputs, overwrite: bool = False) -> Materialization:
    """Check every destination before anything is written (see :func:`materialize`).

    Keeps the inputs' relative paths (each input root in its own subfolder when there are
    several). A destination that already holds the same file (same bytes for a copy, a link
    to the same file for links) is skipped; any other existing destination is refused unless
    ``overwrite``. A destination resolving into an input root is always refused.
    """
    if mode not in ("copy", "symlink", "hardlink"):
        raise UsageError(f"unknown link mode {mode!r} (symlink or hardlink)")
    roots = sorted({item.root for item in items})
    subfolders = root_folder_names(roots) if len(roots) > 1 else {}
    writes, same, conflicts = [], 0, []
    for item, keep in zip(items, selected):
        if not keep:
            continue
        destination = Path(target, subfolders.get(item.root, ""), item.relpath)
        protected.check_write(destination)
        if os.path.lexists(destination):
            if _holds_same_file(destination, item.path, mode):
                same += 1
                continue
            conflicts.append(destination)
        writes.append((item.path, destination))
    if conflicts and not overwrite:
        option = "--copy-to" if mode == "copy" else "--link-to"
        raise UsageError(f"{option} {target}: {len(conflicts)} destination files exist and differ from the "
                         f"selection (e.g. {display_path(str(conflicts[0]))}); pass --overwrite to replace them")
    return Materialization(mode, target, writes, same)


def _holds_same_file(destination: Path, source: str, mode: str) -> bool:
    if mode == "symlink":
        return destination.is_symlink() and os.path.realpath(destination) == os.path.realpath(source)
    if mode == "hardlink":
        return not destination.is_symlink() and os.path.exists(destination) and os.path.samefile(destination, source)
    return not destination.is_symlink() and destination.is_file() and files_identical(destination, source)


def materialize(plan: Materialization) -> int:
    """Write the planned copies or links; returns how many destinations hold the selection.

    Each destination is replaced by a rename (a copy through a temp file, a link made under a
    temp name), so nothing is ever written through an existing file or link, and an input
    can never be truncated, unlinked or replaced.
    """
    for source, destination in plan.writes:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if plan.mode == "copy":
            atomic_copy(source, destination)
            continue
        temp = destination.with_name(f".{destination.name}.{os.getpid()}.link")
        try:
            if plan.mode == "symlink":
                os.symlink(os.path.abspath(source), temp)
            else:
                os.link(source, temp)
            os.replace(temp, destination)
        except OSError as exc:
            try:
                os.remove(temp)
            except OSError:
                pass
            raise FatalError(f"cannot {plan.mode} {destination}: {exc.strerror or exc}") from exc
    return len(plan.writes) + plan.same


def run_select(items: Sequence[ImageItem], model: LoadedModel, options: SelectOptions, config: RunConfig,
               before_write=None) -> tuple[Summary, Selection]:
    """Embed (through the cache), select, and write the manifest (one row per pool image).

    ``before_write(selection)`` runs after the selection and before the manifest is written
    (the CLI checks ``--copy-to`` destinations there, so a refusal writes nothing).
    """
    start = time.monotonic()
    if options.dedup_threshold is None:
        options.dedup_threshold = default_dedup_threshold(model)
    cache_path = options.cache or str(Path(config.output).with_suffix("")) + ".embeddings.parquet"
    if config.protected is not None:
        config.protected.check_file(cache_path, "--cache")
    check_outputs(config)
    mirror = options.mirror and options.dedup
    rows, embedded = embed_with_cache(items, model, config, cache_path, mirror)
    ok = np.array([r.get("status") == "ok" and r.get("image_embedding") is not None for r in rows])
    embeddings = _matrix(rows, ok, "image_embedding", model.device)
    flipped = _matrix(rows, ok, FLIPPED, model.device) if mirror else None
    clip_scores = _clip_scores(items, embeddings, ok, model, options)
    reference = None
    reference_embedded = 0
    if options.reference:
        ref_rows, reference_embedded = embed_with_cache(options.reference, model, config, cache_path)
        ref = [np.asarray(r["image_embedding"], dtype=np.float32) for r in ref_rows if r.get("status") == "ok"]
        if not ref:
            raise UsageError("no reference image could be embedded")
        reference = F.normalize(torch.from_numpy(np.stack(ref)).to(model.device), dim=1)
    selection = select(embeddings, ok, [r.get("content_hash") for r in rows], options, clip_scores, reference,
                       flipped)
    if before_write is not None:
        before_write(selection)
    task = SelectTask(options)
    fields = task.fields()
    metadata = run_metadata(task, model, config, fields)
    metadata["selection_report"] = selection.report
    roots = config.roots or sorted({it.root for it in items})
    metadata["roots"] = roots
    multi_root = len(roots) > 1
    writer = ResultsWriter(config.output, fields, metadata, multi_root=multi_root, overwrite=config.overwrite)
    out_rows = []
    for i, (item, row) in enumerate(zip(items, rows)):
        dup = selection.duplicate_of[i]
        fingerprint = {k: row.get(k) for k in FINGERPRINT_COLUMNS}
        out = base_row(item, row.get("status") or "error", row.get("error"), row.get("width"), row.get("height"),
                       multi_root, fingerprint)
        out.update({
            "selected": bool(selection.rank[i] >= 0), "reason": selection.reason[i],
            "duplicate_of": display_path(items[dup].relpath) if dup >= 0 else None,
            "duplicate_group": int(selection.duplicate_group[i]) if selection.duplicate_group[i] >= 0 else None,
            "duplicate_similarity": None if np.isnan(selection.duplicate_similarity[i])
            else float(selection.duplicate_similarity[i]),
            "cluster": int(selection.cluster[i]) if selection.cluster[i] >= 0 else None,
            "clip_score": None if clip_scores is None or not ok[i] or np.isnan(clip_scores[i])
            else float(clip_scores[i]),
            "rank": int(selection.rank[i]) if selection.rank[i] >= 0 else None,
            "nearest_reference_distance": None if selection.nearest_reference is None
            or np.isnan(selection.nearest_reference[i]) else float(selection.nearest_reference[i]),
        })
        out_rows.append(out)
    try:
        writer.write_rows(out_rows)
        writer.finalize()
    finally:
        writer.close()
    elapsed = time.monotonic() - start
    summary = Summary(task="select-data", inputs=len(items), processed=len(items), ok=int(ok.sum()),
                      failed=int((~ok).sum()), elapsed_s=elapsed, images_per_s=len(items) / max(elapsed, 1e-9),
                      output=str(config.output))
    if model.is_random:
        summary.warnings.append(f"{model.spec} has random weights: its embeddings, and so the selection, "
                                "mean nothing")
    summary.error_examples = [f"{display_path(it.relpath)}: {r.get('error')}" for it, r in zip(items, rows)
                              if r.get("status") != "ok"][:5]
    summary.task_summary = {**selection.report, "embedded": embedded, "reference_embedded": reference_embedded,
                            "cache": cache_path, "dedup_threshold": options.dedup_threshold,
                            "duplicate_group_examples": _group_examples(items, selection)}
    return summary, selection


def _group_examples(items: Sequence[ImageItem], selection: Selection, limit: int = 5) -> list[dict]:
    """The largest duplicate groups: the kept image, then each copy with its similarity to it."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(selection.duplicate_group):
        if g >= 0:
            groups.setdefault(int(g), []).append(i)
    largest = sorted(groups.values(), key=lambda members: (-len(members), members[0]))[:limit]
    examples = []
    for members in largest:
        kept = next(i for i in members if selection.duplicate_of[i] < 0)
        examples.append({"kept": display_path(items[kept].relpath), "size": len(members), "copies": [
            {"path": display_path(items[i].relpath), "reason": selection.reason[i],
             "similarity": round(float(selection.duplicate_similarity[i]), 4)} for i in members if i != kept]})
    return examples


def _matrix(rows: list[dict], ok: np.ndarray, column: str, device) -> torch.Tensor:
    """[n, d] normalized embeddings from ``column`` of the ok rows (zeros elsewhere)."""
    dim = next((len(r[column]) for r in rows if r.get(column) is not None), 1)
    matrix = np.zeros((len(rows), dim), dtype=np.float32)
    for i, r in enumerate(rows):
        if ok[i]:
            matrix[i] = np.asarray(r[column], dtype=np.float32)
    return F.normalize(torch.from_numpy(matrix).to(device), dim=1)


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
        values, _ = clip_score(embeddings[torch.tensor(have, device=embeddings.device)], text_embeddings)
        scores[have] = values.cpu().numpy()
    return scores
