"""What `detect-aigi eval` records beside its per-generator table, for the report: ROC and PR
curves per generator, the reliability diagram, the confusion at the detector's threshold and
the images a reader wants to look at (most confident fakes and reals, the worst errors).

All of it is computed once over every scored image and stored in the output's metadata, so a
report of a million-image evaluation reads a few kilobytes, not the images' scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visbatch.core.images import ImageItem, display_path

CURVE_POINTS = 101  # points kept per curve (the first and last always among them)
EXAMPLES = 50  # images kept per gallery


def _thin(*arrays: np.ndarray, limit: int | None) -> list[list[float]]:
    n = arrays[0].size
    if limit is None or n <= limit:
        keep = np.arange(n)
    else:
        keep = np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))
    return [np.round(a[keep], 6).tolist() for a in arrays]


def roc_pr_points(labels: np.ndarray, scores: np.ndarray, limit: int | None = CURVE_POINTS) -> dict:
    """ROC (fpr, tpr) and PR (recall, precision) at every distinct score, highest first, as
    scikit-learn's ``roc_curve`` (without dropping points) and ``precision_recall_curve`` give
    them; thinned to ``limit`` points. Empty when a class is missing."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        return {}
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last_of_score = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # one point per distinct score
    tps = np.cumsum(y)[last_of_score].astype(np.float64)
    fps = (last_of_score + 1 - tps).astype(np.float64)
    fpr, tpr = np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives]
    recall, precision = np.r_[0.0, tps / positives], np.r_[1.0, tps / (tps + fps)]
    fpr, tpr = _thin(fpr, tpr, limit=limit)
    recall, precision = _thin(recall, precision, limit=limit)
    return {"roc": {"fpr": fpr, "tpr": tpr}, "pr": {"recall": recall, "precision": precision}}


def reliability(labels: np.ndarray, p_fake: np.ndarray, bins: int = 10) -> list[dict]:
    """Per bin of predicted p_fake: its mean, the observed share of fakes, the count."""
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(p_fake, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "predicted": round(float(p[mask].mean()), 6),
                    "observed": round(float(y[mask].mean()), 6),
                    "count": int(mask.sum()),
                }
            )
    return out


def confusion(labels: np.ndarray, p_fake: np.ndarray, threshold: float) -> dict:
    y, called = np.asarray(labels) == 1, np.asarray(p_fake) >= threshold
    return {
        "threshold": float(threshold),
        "fake_called_fake": int((y & called).sum()),
        "fake_called_real": int((y & ~called).sum()),
        "real_called_fake": int((~y & called).sum()),
        "real_called_real": int((~y & ~called).sum()),
    }


def _example(item: ImageItem, label: int, generator: str, p: float) -> dict:
    return {
        "root": item.root,
        "path": display_path(item.relpath),
        "label": "fake" if label else "real",
        "generator": generator,
        "p_fake": round(float(p), 6),
    }


def eval_figures(
    items: Sequence[ImageItem], labels: Sequence[int], generators: Sequence[str], p_fake, threshold: float
) -> dict:
    """Everything above, over the scored images (``items[i]`` has ``labels[i]``, ``p_fake[i]``)."""
    y = np.asarray(list(labels), dtype=np.int64)
    p = np.asarray(p_fake, dtype=np.float64).reshape(-1)
    names = list(generators)
    curves = {}
    for generator in sorted(set(names)) + ["all"]:
        mask = np.array([generator == "all" or g == generator for g in names])
        points = roc_pr_points(y[mask], p[mask])
        if points:
            curves[generator] = points
    error = np.abs(y - p)
    fakes = np.flatnonzero(y == 1)
    reals = np.flatnonzero(y == 0)

    def pick(index: np.ndarray, key: np.ndarray) -> list[dict]:
        chosen = index[np.argsort(key[index], kind="stable")][:EXAMPLES]
        return [_example(items[i], int(y[i]), names[i], p[i]) for i in chosen]

    wrong = np.flatnonzero((p >= threshold) != (y == 1))
    return {
        "curves": curves,
        "reliability": reliability(y, p),
        "confusion": confusion(y, p, threshold),
        "most_confident_fakes": pick(fakes, -p),
        "most_confident_reals": pick(reals, p),
        "worst_errors": pick(wrong, -error),
    }
