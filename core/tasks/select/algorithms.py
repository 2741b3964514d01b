"""The maths of select-data, as functions of normalized embeddings (torch, on any device).

Distances are cosine distances ``1 - cos`` between L2-normalized embeddings.
Everything is chunked so that no n x n matrix over the whole pool is ever
built: cost grows close to linearly with the pool for a fixed number of
clusters per point.

The pool's embeddings may be held in fp16 (``select-data`` keeps them so: 1 KB per
512-d image, 10 GB for ten million); every product is taken in fp32 on a chunk or a
cluster at a time (:func:`f32`), so results do not depend on the storage type beyond
its rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def default_clusters(n: int) -> int:
    """sqrt(n) clusters (about sqrt(n) images each): 1,000 for a million images."""
    return max(1, min(n, int(round(math.sqrt(n)))))


def f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 for a product (a copy only when it is stored in another type)."""
    return x if x.dtype == torch.float32 else x.float()


def _chunked_nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536):
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    sims = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        s = f32(x[start : start + chunk]) @ centroids.T
        best = s.max(dim=1)
        labels[start : start + chunk], sims[start : start + chunk] = best.indices, best.values
    return labels, sims


def spherical_kmeans(
    x: torch.Tensor, k: int, iterations: int = 20, seed: int = 0, max_points_per_centroid: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere (cosine similarity), k-means++-style seeding on a sample.

    The centroids are trained on at most ``max_points_per_centroid * k``
    points (faiss's default rule), then every point is assigned once: the
    cost stays linear in the pool. Returns ``(labels [n], centroids [k, d])``;
    centroids are normalized.
    Reference: Dhillon & Modha, "Concept decompositions for large sparse text
    data using clustering", Machine Learning 2001 (spherical k-means), as
    used by SemDeDup.
    """
    n = x.shape[0]
    k = max(1, min(k, n))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sample = f32(x[torch.randperm(n, generator=generator)[: min(n, 50 * k)].to(x.device)])
    # k-means++ seeding on the sample: each next centre far from the chosen ones.
    chosen = [int(torch.randint(sample.shape[0], (1,), generator=generator))]
    closest = 1 - sample @ sample[chosen[0]]
    for _ in range(1, k):
        weights = closest.clamp(min=0).cpu().double() ** 2
        index = (
            int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
            if weights.sum() > 0
            else int(torch.randint(sample.shape[0], (1,), generator=generator))
        )
        chosen.append(index)
        closest = torch.minimum(closest, 1 - sample @ sample[index])
    centroids = sample[chosen].clone()
    train = (
        x
        if n <= max_points_per_centroid * k
        else x[torch.randperm(n, generator=generator)[: max_points_per_centroid * k].to(x.device)]
    )
    labels = None
    for _ in range(iterations):
        new_labels, _ = _chunked_nearest(train, centroids)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids)
        for start in range(0, train.shape[0], 65536):
            sums.index_add_(0, labels[start : start + 65536], f32(train[start : start + 65536]))
        counts = torch.bincount(labels, minlength=k)
        empty = counts == 0
        sums[empty] = centroids[empty]  # an empty cluster keeps its centre
        centroids = torch.nn.functional.normalize(sums, dim=1)
    if train is not x or labels is None:
        labels, _ = _chunked_nearest(x, centroids)
    return labels, centroids


def second_clusters(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Each point's second-nearest centroid (its own cluster when there is only one)."""
    if centroids.shape[0] < 2:
        return labels.clone()
    second = torch.empty_like(labels)
    for start in range(0, x.shape[0], chunk):
        sims = f32(x[start : start + chunk]) @ centroids.T
        sims[torch.arange(sims.shape[0], device=x.device), labels[start : start + chunk]] = -2.0
        second[start : start + chunk] = sims.argmax(dim=1)
    return second


def pair_similarity(
    a: torch.Tensor, b: torch.Tensor, a_flipped: torch.Tensor | None = None, b_flipped: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosines ``a @ b.T`` of normalized embeddings; with the embeddings of the horizontally
    flipped images, the larger of ``a.b``, ``a.flip(b)`` and ``flip(a).b`` (a mirrored copy
    matches its original)."""
    sims = a @ b.T
    if a_flipped is not None and b_flipped is not None:
        sims = torch.maximum(sims, torch.maximum(a @ b_flipped.T, a_flipped @ b.T))
    return sims


def semantic_duplicates(
    x: torch.Tensor,
    labels: torch.Tensor,
    priority: torch.Tensor,
    threshold: float,
    block: int = 4096,
    flipped: torch.Tensor | None = None,
    second: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SemDeDup's rule: drop any image more similar than ``threshold`` to a higher-priority image of
    its cluster, kept or not (Abbas et al., "SemDeDup: Data-efficient learning at web-scale through
    semantic deduplication", 2023).

    ``priority`` [n]: higher is kept first (closeness to the centroid, or the caption score); ties
    keep the earlier index. ``flipped`` [n, d]: embeddings of the mirrored images, for
    mirror-invariant similarity (:func:`pair_similarity`). ``second`` [n]: each image's
    second-nearest cluster; the image is then also compared within that cluster, so near copies
    that k-means put on either side of a boundary are still found. Only within-cluster
    similarity matrices are built.

    Returns ``(duplicate_of, similarity, nearest, nearest_similarity)`` [n]: -1 for kept
    images, else the index of the kept image it duplicates (chains of drops are followed to a
    kept one), and the similarity of each dropped image to that kept image (nan for kept
    images); then, for every image, the most similar higher-priority image of its clusters and
    that similarity (-1 and nan when it has none): the comparison the rule makes, so an image
    is dropped at a threshold ``t`` exactly when its nearest similarity is above ``t``.
    """
    n = x.shape[0]
    device = x.device
    # One global order: rank 0 is kept first. Every comparison is "a later image against earlier ones".
    order = torch.argsort(-priority.float(), stable=True)
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device)
    best_sim = torch.full((n,), -2.0, device=device)
    best_idx = torch.full((n,), -1, dtype=torch.long, device=device)
    memberships = [labels] + ([second] if second is not None else [])
    all_labels = torch.cat(memberships)
    owners = torch.cat([torch.arange(n, device=device)] * len(memberships))
    # Members of every cluster at once: sorted by cluster, split by count (one pass, not one per cluster).
    by_cluster = torch.argsort(all_labels, stable=True)
    counts = torch.bincount(all_labels).tolist()
    for grouped in torch.split(owners[by_cluster], counts):
        members = torch.unique(grouped)
        if members.numel() < 2:
            continue
        members = members[torch.argsort(rank[members])]
        emb = f32(x[members])  # one cluster in fp32 at a time
        emb_flipped = f32(flipped[members]) if flipped is not None else None
        m = members.numel()
        for row in range(0, m, block):
            end = min(row + block, m)
            sims = pair_similarity(
                emb[row:end], emb, None if emb_flipped is None else emb_flipped[row:end], emb_flipped
            )
            rows = torch.arange(row, end, device=device).view(-1, 1)
            cols = torch.arange(m, device=device).view(1, -1)
            sims = sims.masked_fill(cols <= rows, -2.0)  # only later members (cols) vs earlier ones (rows)
            col_best = sims.max(dim=0)
            better = col_best.values > best_sim[members]
            best_sim[members] = torch.where(better, col_best.values, best_sim[members])
            best_idx[members] = torch.where(better, members[col_best.indices + row], best_idx[members])
    duplicate_of = torch.where(best_sim > threshold, best_idx, torch.full_like(best_idx, -1))
    # Follow chains (a duplicate of a duplicate) to a kept image: each link goes to a higher priority.
    for _ in range(n):
        parent = duplicate_of.clamp(min=0)
        grand = torch.where(duplicate_of >= 0, duplicate_of[parent], duplicate_of)
        chained = (duplicate_of >= 0) & (grand >= 0)
        if not chained.any():
            break
        duplicate_of = torch.where(chained, grand, duplicate_of)
    dropped = duplicate_of >= 0
    similarity = torch.full((n,), float("nan"), device=device)
    if dropped.any():
        i, j = torch.nonzero(dropped).flatten(), duplicate_of[dropped]
        sims = (f32(x[i]) * f32(x[j])).sum(dim=1)
        if flipped is not None:
            sims = torch.maximum(
                sims,
                torch.maximum((f32(x[i]) * f32(flipped[j])).sum(dim=1), (f32(flipped[i]) * f32(x[j])).sum(dim=1)),
            )
        similarity[i] = sims
    has_nearest = best_idx >= 0
    nearest_similarity = torch.where(has_nearest, best_sim, torch.full_like(best_sim, float("nan")))
    return duplicate_of, similarity, best_idx, nearest_similarity


def kcenter_greedy(
    x: torch.Tensor, budget: int, seed: int = 0, initial: torch.Tensor | None = None, chunk: int = 262144
) -> torch.Tensor:
    """Greedy k-center (Gonzalez 1985; the core-set selection of Sener & Savarese, ICLR 2018):
    repeatedly add the point farthest from the chosen set. A 2-approximation of the best
    max coverage distance. O(budget * n * d), chunked over n."""
    n = x.shape[0]
    budget = min(budget, n)
    if budget <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=generator)) if initial is None else int(initial)
    chosen = [first]
    distance = torch.empty(n, device=x.device)
    for start in range(0, n, chunk):
        distance[start : start + chunk] = 1 - f32(x[start : start + chunk]) @ f32(x[first])
    for _ in range(budget - 1):
        index = int(torch.argmax(distance))
        chosen.append(index)
        center = f32(x[index])
        for start in range(0, n, chunk):
            distance[start : start + chunk] = torch.minimum(
                distance[start : start + chunk], 1 - f32(x[start : start + chunk]) @ center
            )
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def allocate(budget: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``budget`` over groups in proportion to ``sizes`` (largest remainders), capped by size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if budget >= sizes.sum():
        return sizes.copy()
    share = budget * sizes / max(sizes.sum(), 1)
    counts = np.minimum(np.floor(share).astype(np.int64), sizes)
    rest = budget - counts.sum()
    order = np.argsort(-(share - counts), kind="stable")
    for index in order:
        if rest <= 0:
            break
        if counts[index] < sizes[index]:
            counts[index] += 1
            rest -= 1
    return counts


def cluster_balanced(labels: np.ndarray, budget: int, seed: int = 0) -> np.ndarray:
    """Round robin over clusters in random order, members of each cluster in random order.

    Every cluster gets an image before any gets a second: small clusters
    (rare content) are not drowned by large ones.
    """
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    shuffled = rng.permutation(n)
    # Position of each image within its cluster, in the shuffled order.
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    sorted_labels = labels[order]
    first_of_cluster = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    position = np.arange(n) - np.repeat(first_of_cluster, np.diff(np.r_[first_of_cluster, n]))
    cluster_rank = rng.permutation(labels.max() + 1)[sorted_labels]
    picked = order[np.lexsort((cluster_rank, position))]
    return picked[: min(budget, n)]


def targeted_selection(
    pool: torch.Tensor, reference: torch.Tensor, budget: int, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distribution matching to a reference set by round-robin nearest neighbours.

    Each reference image in turn takes its nearest pool image not yet taken,
    until the budget is filled, so every reference image is represented by
    about ``budget / len(reference)`` neighbours and dense regions of the
    reference get proportionally more of the subset. This is the greedy
    nearest-neighbour transport that targeted selection methods such as
    TAROT (distribution matching with optimal transport) approximate; it
    lowers the MMD between subset and reference relative to a random subset.
    Cost: O(len(reference) * n * d) similarity, chunked, plus a top-k per
    reference image. Returns ``(selected indices in pick order,
    nearest reference distance of every pool image)``.
    """
    n, r = pool.shape[0], reference.shape[0]
    budget = min(budget, n)
    per_reference = min(n, math.ceil(budget / max(r, 1)) * 4 + 8)
    candidates = torch.empty(r, per_reference, dtype=torch.long, device=pool.device)
    nearest = torch.full((n,), 2.0, device=pool.device)
    pool_chunk = 65536
    for start in range(0, r, chunk):
        queries = f32(reference[start : start + chunk])
        best_values = torch.empty(queries.shape[0], 0, device=pool.device)
        best_index = torch.empty(queries.shape[0], 0, dtype=torch.long, device=pool.device)
        for first in range(0, n, pool_chunk):
            sims = queries @ f32(pool[first : first + pool_chunk]).T
            nearest[first : first + pool_chunk] = torch.minimum(
                nearest[first : first + pool_chunk], 1 - sims.max(dim=0).values
            )
            # The running top per reference image over the pool chunks seen so far.
            values = torch.cat([best_values, sims], dim=1)
            positions = torch.cat(
                [best_index, torch.arange(first, first + sims.shape[1], device=pool.device).expand_as(sims)], dim=1
            )
            best_values, keep = values.topk(min(per_reference, values.shape[1]), dim=1)
            best_index = positions.gather(1, keep)
        candidates[start : start + chunk] = best_index
    taken = torch.zeros(n, dtype=torch.bool)
    cand = candidates.cpu().numpy()
    pointer = np.zeros(r, dtype=np.int64)
    picked: list[int] = []
    active = list(range(r))
    while len(picked) < budget and active:
        still = []
        for ref in active:
            while pointer[ref] < per_reference and taken[cand[ref, pointer[ref]]]:
                pointer[ref] += 1
            if pointer[ref] < per_reference:
                index = int(cand[ref, pointer[ref]])
                taken[index] = True
                picked.append(index)
                if len(picked) >= budget:
                    break
                still.append(ref)
        active = still
    if len(picked) < budget:  # every reference ran out of candidates: fill by nearest distance
        rest = torch.argsort(nearest.cpu())
        for index in rest.tolist():
            if len(picked) >= budget:
                break
            if not taken[index]:
                taken[index] = True
                picked.append(index)
    return torch.tensor(picked, dtype=torch.long), nearest


# ----------------------------------------------------------------------------
# Report measures
# ----------------------------------------------------------------------------


def coverage(
    pool: torch.Tensor, selected: torch.Tensor, sample: int = 5000, seed: int = 0, chunk: int = 8192
) -> tuple[float, float]:
    """(mean, max) cosine distance from pool images to their nearest selected image,
    over a random sample of the pool (the whole pool when smaller)."""
    if selected.shape[0] == 0:
        return float("nan"), float("nan")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    index = torch.randperm(pool.shape[0], generator=generator)[:sample].to(pool.device)
    points = f32(pool[index])
    best = torch.full((points.shape[0],), -2.0, device=pool.device)
    for start in range(0, selected.shape[0], chunk):
        best = torch.maximum(best, (points @ f32(selected[start : start + chunk]).T).max(dim=1).values)
    distance = (1 - best).clamp(min=0)
    return float(distance.mean()), float(distance.max())


def diversity(selected: torch.Tensor, sample: int = 4000, seed: int = 0) -> float:
    """Mean pairwise cosine distance within the selection (on a random sample of it)."""
    m = selected.shape[0]
    if m < 2:
        return float("nan")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    points = f32(selected[torch.randperm(m, generator=generator)[:sample].to(selected.device)])
    sims = points @ points.T
    k = points.shape[0]
    return float(1 - (sims.sum() - sims.diagonal().sum()) / (k * (k - 1)))


def mmd(a: torch.Tensor, b: torch.Tensor, sample: int = 4000, seed: int = 0) -> float:
    """Maximum mean discrepancy with a Gaussian kernel, bandwidth by the median heuristic
    (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012), biased estimate, on samples."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = a[torch.randperm(a.shape[0], generator=generator)[:sample].to(a.device)].float()
    b = b[torch.randperm(b.shape[0], generator=generator)[:sample].to(b.device)].float()
    joint = torch.cat([a, b])
    sq = torch.cdist(joint, joint).pow(2)
    bandwidth = sq[sq > 0].median() if (sq > 0).any() else torch.tensor(1.0)
    kernel = torch.exp(-sq / bandwidth)
    na = a.shape[0]
    value = kernel[:na, :na].mean() + kernel[na:, na:].mean() - 2 * kernel[:na, na:].mean()
    return float(value.clamp(min=0).sqrt())
