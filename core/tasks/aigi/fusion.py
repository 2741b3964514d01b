"""detect-aigi's classifier: one logistic regression per feature group, fused by a stacked one.

Why not one regression over the concatenated features: with few training
images, the high-dimensional groups (``layers``, ``embedding``: hundreds of
columns) dominate it and learn the training generators, while the small
artefact groups (``npr``, ``bitplane``, ``spectrum``) are the ones that carry
over to generators never seen. Here each group gets its own regression (and
its own L2), the fusion regression sees one calibrated logit per group, fitted
on **out-of-fold** logits so it learns how far each group holds on images its
regression did not train on (stacking, Wolpert 1992).

Folds: when the training data has generator folders (the ForenSynths layout,
``ROOT/<generator>/0_real|1_fake``), one fold per generator: leave one
generator out, the question users ask of a detector. Otherwise stratified
K folds (whole ``--group-pattern`` groups on one side). The same folds choose
each group's L2, and (leave-one-generator-out only) which groups to keep.

The fused logit is linear in the features (a linear map of linear maps), so
averaging tiles' logits, patch heatmaps and per-group shares keep their
meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from visbatch.core.tasks.aigi.classifier import LogisticModel, auroc, average_precision, fit_logistic

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
FUSION_L2 = 1e-2
FOLDS = 5
# A group whose leave-one-generator-out AUROC stays below this is "at chance" (0.5 is a coin).
CHANCE_AUROC = 0.6
# Forward selection adds a group only when the mean held-out AP rises by more than this.
MIN_GAIN = 0.005


@dataclass
class GroupModel:
    group: str
    columns: torch.Tensor  # long [w]: the group's columns in the detector's feature vector
    model: LogisticModel
    l2: float


@dataclass
class FusedClassifier:
    """Per-group regressions and the stacked regression over their logits."""

    members: list[GroupModel]
    fusion: LogisticModel  # over [n, len(members)] member logits

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float().cpu()
        return torch.stack([m.model.logits(x[:, m.columns]) for m in self.members], dim=1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.fusion.logits(self.member_logits(features))

    def group_contributions(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each group's term of the fused logit (their sum plus the fusion bias is the logit)."""
        terms = self.fusion.contributions(self.member_logits(features))
        return {m.group: terms[:, i] for i, m in enumerate(self.members)}


# ----------------------------------------------------------------------------
# Folds
# ----------------------------------------------------------------------------


def generator_folds(labels: Sequence[int] | np.ndarray, generators: Sequence[str]) -> np.ndarray | None:
    """One fold id per item, one fold per generator, when there are at least 3 generators and each
    has real and fake images (so every held-out fold can be scored and every training side has both
    classes); otherwise None."""
    labels = np.asarray(labels)
    names = sorted(set(generators))
    if len(names) < 3:
        return None
    gens = np.asarray(generators, dtype=object)
    for name in names:
        fold = labels[gens == name]
        if (fold == 0).sum() == 0 or (fold == 1).sum() == 0:
            return None
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[g] for g in generators])


def stratified_folds(
    labels: Sequence[int] | np.ndarray, k: int = FOLDS, seed: int = 0, groups: Sequence[str] | None = None
) -> np.ndarray:
    """Fold ids with each class spread over ``k`` folds (fewer when a class is smaller); with
    ``groups``, the items of one group share a fold."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), dtype=np.int64)
    k = max(2, min(k, int(min((labels == 0).sum(), (labels == 1).sum()))))
    for value in (0, 1):
        index = rng.permutation(np.flatnonzero(labels == value))
        if groups is None:
            folds[index] = np.arange(len(index)) % k
            continue
        names = np.asarray(groups, dtype=object)[index]
        for i, name in enumerate(dict.fromkeys(names.tolist())):
            folds[index[names == name]] = i % k
    return folds


# ----------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------


def _fold_scores(
    labels: torch.Tensor, folds: np.ndarray, logits: torch.Tensor
) -> tuple[float, float, dict[int, float]]:
    """(mean AP over folds, mean AUROC over folds, {fold: AP}) of out-of-fold ``logits``; a fold
    with one class has no AP and is left out."""
    aps, aucs = {}, []
    for fold in np.unique(folds).tolist():
        mask = torch.from_numpy(folds == fold)
        y = labels[mask]
        if y.min() == y.max():
            continue
        aps[fold] = average_precision(y, logits[mask])
        aucs.append(auroc(y, logits[mask]))
    if not aps:
        return float("nan"), float("nan"), {}
    return float(np.mean(list(aps.values()))), float(np.mean(aucs)), aps


def out_of_fold(features: torch.Tensor, labels: torch.Tensor, folds: np.ndarray, l2: float) -> torch.Tensor:
    """Each item's logit from a regression fitted on the other folds."""
    logits = torch.zeros(len(labels))
    for fold in np.unique(folds):
        held = torch.from_numpy(folds == fold)
        train = ~held
        if labels[train].min() == labels[train].max():
            continue  # cannot fit one class; these items keep logit 0 (no evidence)
        logits[held] = fit_logistic(features[train], labels[train], l2=l2).logits(features[held])
    return logits


def _stacked_out_of_fold(member_logits: torch.Tensor, labels: torch.Tensor, folds: np.ndarray) -> torch.Tensor:
    """The fusion regression's out-of-fold logits over out-of-fold member logits."""
    return out_of_fold(member_logits, labels, folds, FUSION_L2)


@dataclass
class GroupCheck:
    """What the folds say about one group at its chosen L2."""

    group: str
    l2: float
    mean_ap: float
    mean_auroc: float
    per_fold_ap: dict[int, float]
    oof_logits: torch.Tensor


def check_group(
    group: str, features: torch.Tensor, labels: torch.Tensor, folds: np.ndarray, l2_grid: Sequence[float] = L2_GRID
) -> GroupCheck:
    """The group's L2 chosen by mean held-out-fold AP (ties: the stronger regularisation)."""
    best = None
    for l2 in sorted(l2_grid, reverse=True):
        logits = out_of_fold(features, labels, folds, l2)
        ap, auc, per_fold = _fold_scores(labels, folds, logits)
        if best is None or (ap == ap and ap > best.mean_ap + 1e-9):
            best = GroupCheck(group, l2, ap, auc, per_fold, logits)
    return cast(GroupCheck, best)  # set on the first L2 of the (non-empty) grid


@dataclass
class FusionFit:
    classifier: FusedClassifier
    checks: list[GroupCheck]  # every requested group
    selected: list[str]
    fold_kind: str  # "generator" or "stratified"
    fold_names: list[str]
    fused_per_fold_ap: dict[int, float]
    fused_mean_ap: float


def fit_fused(
    features: torch.Tensor,
    labels: torch.Tensor,
    columns: dict[str, torch.Tensor],
    folds: np.ndarray,
    fold_kind: str,
    fold_names: Sequence[str],
    select: bool,
    l2: float | None = None,
) -> FusionFit:
    """Per-group L2 (chosen from :data:`L2_GRID`, or ``l2`` for every group) and out-of-fold logits;
    with ``select``, greedy forward selection of groups by the stacked fusion's mean held-out-fold
    AP; then every kept group and the fusion refitted on all rows."""
    grid = L2_GRID if l2 is None else (l2,)
    checks = [check_group(g, features[:, cols], labels, folds, grid) for g, cols in columns.items()]
    by_group = {c.group: c for c in checks}

    def fused_score(names: list[str]) -> tuple[float, dict[int, float]]:
        stacked = torch.stack([by_group[n].oof_logits for n in names], dim=1)
        ap, _, per_fold = _fold_scores(labels, folds, _stacked_out_of_fold(stacked, labels, folds))
        return ap, per_fold

    ranked = sorted(checks, key=lambda c: -(c.mean_ap if c.mean_ap == c.mean_ap else -1))
    if select:
        selected = [ranked[0].group]
        score, per_fold = fused_score(selected)
        improved = True
        while improved:
            improved = False
            best_add = None
            for check in ranked:
                if check.group in selected:
                    continue
                ap, pf = fused_score(selected + [check.group])
                if ap > score + MIN_GAIN and (best_add is None or ap > best_add[1]):
                    best_add = (check.group, ap, pf)
            if best_add is not None:
                selected.append(best_add[0])
                score, per_fold = best_add[1], best_add[2]
                improved = True
        selected = [g for g in columns if g in selected]  # the requested order
    else:
        selected = list(columns)
        score, per_fold = fused_score(selected)
    members = [
        GroupModel(g, columns[g], fit_logistic(features[:, columns[g]], labels, l2=by_group[g].l2), by_group[g].l2)
        for g in selected
    ]
    stacked = torch.stack([by_group[g].oof_logits for g in selected], dim=1)
    fusion = fit_logistic(stacked, labels, l2=FUSION_L2)
    return FusionFit(FusedClassifier(members, fusion), checks, selected, fold_kind, list(fold_names), per_fold, score)


def chance_groups(checks: Sequence[GroupCheck]) -> list[str]:
    """Groups whose held-out-fold AUROC is at chance."""
    return [c.group for c in checks if not c.mean_auroc >= CHANCE_AUROC]


def held_out_generator_ap(
    features: torch.Tensor,
    labels: torch.Tensor,
    generators: Sequence[str],
    columns: dict[str, torch.Tensor],
    select: bool = True,
    l2: float | None = None,
) -> dict[str, dict]:
    """An outer leave-one-generator-out check of the whole training procedure: for each generator,
    :func:`fit_fused` on the others (its own inner folds and selection never see it), then the AP on
    it. Returns ``{generator: {"ap": AP of the fused detector, "selected": its groups, "group_ap":
    {group: AP of that group's regression alone, at the L2 the inner folds chose}}}``."""
    out = {}
    gens = np.asarray(generators, dtype=object)
    for name in sorted(set(generators)):
        held = torch.from_numpy(gens == name)
        train = ~held
        train_gens = gens[train.numpy()].tolist()
        folds = generator_folds(labels[train].tolist(), train_gens)
        kind = "generator"
        if folds is None:
            folds, kind = stratified_folds(labels[train].tolist()), "stratified"
        fit = fit_fused(
            features[train],
            labels[train],
            columns,
            folds,
            kind,
            sorted(set(train_gens)),
            select=select and kind == "generator" and len(columns) > 1,
            l2=l2,
        )
        alone = {}
        for check in fit.checks:
            cols = columns[check.group]
            model = fit_logistic(features[train][:, cols], labels[train], l2=check.l2)
            alone[check.group] = average_precision(labels[held], model.logits(features[held][:, cols]))
        out[name] = {
            "ap": average_precision(labels[held], fit.classifier.logits(features[held])),
            "selected": fit.selected,
            "group_ap": alone,
        }
    return out
