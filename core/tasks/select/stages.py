"""select-data's reduce stages over the gathered embeddings: exact duplicates, near duplicates
(SemDeDup), the caption filter and the budget fill (the :data:`STRATEGIES` registry), with the
report against a random subset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from visbatch.core.errors import UsageError
from visbatch.core.images import ImageItem
from visbatch.core.models import LoadedModel
from visbatch.core.tasks.select import algorithms as alg
from visbatch.core.texts import TextTable


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


def default_dedup_threshold(model: LoadedModel) -> float:
    """0.95 for CLIP embeddings (SemDeDup's setting); 0.85 for classifier features.

    Classifier features are pooled after ReLU, all non-negative, and spread
    differently: on efficientnet-lite0, resized, re-compressed (JPEG q30),
    cropped and flipped copies of the committed photos score 0.888 to 1.0
    against their originals while distinct photos score at most 0.264, so
    0.95 would miss half the copies.
    """
    return model.adapter.default_dedup_threshold


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
    # The most similar higher-priority image each image was compared with (SemDeDup's comparison;
    # an exact copy's is its twin), -1 when none, and that similarity: the threshold explorer's input.
    nearest: np.ndarray | None = None
    nearest_similarity: np.ndarray | None = None


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


@dataclass(frozen=True)
class BudgetFill:
    """What a budget-fill strategy sees: the eligible candidates, in pool order."""

    pool: torch.Tensor  # [m, d] normalized embeddings of the candidates
    clusters: np.ndarray  # [m] k-means cluster of each candidate
    budget: int  # how many to pick (<= m)
    seed: int
    clip_scores: np.ndarray | None  # [m] caption scores, where there are captions
    reference: torch.Tensor | None  # [r, d] reference embeddings (--reference)


@dataclass(frozen=True)
class Strategy:
    """A budget-fill strategy: ``pick(fill)`` returns (candidate indices in pick order, each
    candidate's distance to its nearest reference image or None)."""

    pick: Callable[[BudgetFill], tuple[np.ndarray, np.ndarray | None]]
    description: str
    needs: tuple[str, ...] = ()  # BudgetFill fields that must be present: "clip_scores", "reference"


NEED_FLAGS = {"clip_scores": "captions (--captions, --sidecar) or --prompt", "reference": "--reference DIR"}


def _random(fill: BudgetFill):
    return np.random.default_rng(fill.seed).permutation(fill.pool.shape[0])[: fill.budget], None


def _top_clip_score(fill: BudgetFill):
    assert fill.clip_scores is not None  # the strategy needs clip_scores
    return np.argsort(-np.nan_to_num(fill.clip_scores, nan=-np.inf), kind="stable")[: fill.budget], None


def _kcenter(fill: BudgetFill):
    return _kcenter_partitioned(fill.pool, fill.clusters, fill.budget, fill.seed), None


def _cluster_balanced(fill: BudgetFill):
    return alg.cluster_balanced(fill.clusters, fill.budget, fill.seed), None


def _targeted(fill: BudgetFill):
    chosen, near = alg.targeted_selection(fill.pool, fill.reference, fill.budget)
    return chosen.numpy(), near.cpu().numpy()


# The registry: adding a strategy is one function and one entry (the CLI reads the names from here).
STRATEGIES: dict[str, Strategy] = {
    "random": Strategy(_random, "a uniform random subset"),
    "top-clip-score": Strategy(_top_clip_score, "the best caption scores", needs=("clip_scores",)),
    "kcenter": Strategy(_kcenter, "greedy k-center: the largest distance to the subset minimized"),
    "cluster-balanced": Strategy(_cluster_balanced, "round robin over k-means clusters"),
    "targeted": Strategy(_targeted, "nearest pool image to each reference image in turn", needs=("reference",)),
}


def select(
    embeddings: torch.Tensor,
    ok: np.ndarray,
    hashes: list,
    options: SelectOptions,
    clip_scores: np.ndarray | None = None,
    reference: torch.Tensor | None = None,
    flipped: torch.Tensor | None = None,
) -> Selection:
    """Run the four stages over the pool (rows in path order). ``ok`` masks images that embedded;
    ``flipped`` are the embeddings of the mirrored images (mirror-invariant dedup)."""
    n = embeddings.shape[0]
    reason = ["kept" if good else "error" for good in ok]
    duplicate_of = [-1] * n
    similarity = np.full(n, np.nan, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int64)
    nearest_similarity = np.full(n, np.nan, dtype=np.float32)
    # 1. exact duplicates: the first in path order is kept.
    first_with_hash: dict[str, int] = {}
    for i in range(n):
        if ok[i] and hashes[i]:
            if hashes[i] in first_with_hash:
                reason[i], duplicate_of[i] = "exact_duplicate", first_with_hash[hashes[i]]
                similarity[i] = nearest_similarity[i] = 1.0
                nearest[i] = duplicate_of[i]
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
            assert centroids is not None  # k-means ran: the pool is not empty
            priority = _closeness(x, centroids, torch.from_numpy(clusters[index]).to(x.device)).cpu()
        local_labels = torch.from_numpy(clusters[index]).to(x.device)
        dup, sims, near_index, near_sims = alg.semantic_duplicates(
            x,
            local_labels,
            priority.to(x.device),
            options.dedup_threshold,
            flipped=_rows(flipped, index) if flipped is not None else None,
            second=alg.second_clusters(x, centroids, local_labels),
        )
        dup, sims = dup.cpu().numpy(), sims.cpu().numpy()
        near_index, near_sims = near_index.cpu().numpy(), near_sims.cpu().numpy()
        has = near_index >= 0
        nearest[index[has]] = index[near_index[has]]
        nearest_similarity[index] = near_sims
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
        for i in np.flatnonzero(eligible & (scores < threshold)).tolist():
            reason[i] = "low_clip_score"
        eligible = np.array([r == "kept" for r in reason])
    # 4. budget fill.
    candidates = np.flatnonzero(eligible)
    budget = min(budget_count(options.budget, int(ok.sum())), candidates.size)
    pool = _rows(embeddings, candidates)
    nearest_reference = None
    strategy = STRATEGIES.get(options.strategy)
    if strategy is None:
        raise UsageError(f"unknown --strategy {options.strategy!r} (choose from {', '.join(STRATEGIES)})")
    fill = BudgetFill(
        pool=pool,
        clusters=clusters[candidates],
        budget=budget,
        seed=options.seed,
        clip_scores=None if clip_scores is None else clip_scores[candidates],
        reference=reference,
    )
    for need in strategy.needs:
        if getattr(fill, need) is None or (need == "reference" and reference.shape[0] == 0):
            raise UsageError(f"--strategy {options.strategy} needs {NEED_FLAGS[need]}")
    picked, near = strategy.pick(fill)
    nearest_reference = None
    if near is not None:
        nearest_reference = np.full(n, np.nan, dtype=np.float32)
        nearest_reference[candidates] = near
    rank = np.full(n, -1, dtype=np.int64)
    rank[candidates[picked]] = np.arange(len(picked))
    for i in candidates.tolist():
        if rank[i] < 0:
            reason[i] = "over_budget"
    report: dict[str, Any] = {"comparison": _report(pool, picked, options, reference, clip_scores, candidates)}
    report.update(
        pool=int(n),
        errors=int((~ok).sum()),
        exact_duplicates=reason.count("exact_duplicate"),
        near_duplicates=reason.count("near_duplicate"),
        low_clip_score=reason.count("low_clip_score"),
        eligible=int(candidates.size),
        budget=int(budget),
        selected=int(len(picked)),
        clusters=int(k),
        clip_score_threshold=threshold,
    )
    report.update(
        duplicate_groups=int(groups.max() + 1) if (groups >= 0).any() else 0,
        largest_duplicate_group=int(np.bincount(groups[groups >= 0]).max()) if (groups >= 0).any() else 0,
    )
    return Selection(
        reason,
        duplicate_of,
        clusters,
        clip_scores,
        rank,
        nearest_reference,
        report,
        similarity,
        groups,
        nearest,
        nearest_similarity,
    )


def _closeness(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Each image's cosine to its cluster's centroid, a chunk at a time in fp32."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = alg.f32(x[start : start + chunk])
        out[start : start + chunk] = (rows * centroids[labels[start : start + chunk]]).sum(dim=1)
    return out


def _rows(embeddings: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``embeddings[index]`` without a copy when the index is every row (a million rows is 2 GB)."""
    if index.size == embeddings.shape[0]:
        return embeddings
    return embeddings[torch.from_numpy(index).to(embeddings.device)]


def _kcenter_partitioned(
    pool: torch.Tensor, labels: np.ndarray, budget: int, seed: int, exact_limit: int = 200_000_000
) -> np.ndarray:
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


def _report(pool: torch.Tensor, picked: np.ndarray, options: SelectOptions, reference, clip_scores, candidates) -> dict:
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
