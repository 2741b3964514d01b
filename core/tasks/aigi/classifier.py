"""The detector's classifier and its evaluation, as plain functions on tensors.

- :func:`fit_logistic`: L2-regularised logistic regression on standardized
  features, fitted with L-BFGS on the device.
- :func:`fit_platt`: Platt scaling (Platt 1999) of held-out logits,
  ``p = sigmoid(a * z + b)``.
- :func:`choose_threshold`: the probability threshold with the best
  balanced accuracy on held-out data.
- :func:`average_precision`, :func:`auroc`, :func:`expected_calibration_error`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LogisticModel:
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    weight: torch.Tensor  # [d]
    bias: torch.Tensor  # []

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias

    def contributions(self, features: torch.Tensor) -> torch.Tensor:
        """Per-feature terms of the logit (their sum plus the bias is the logit)."""
        return ((features.float() - self.mean) / self.std) * self.weight


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, iterations: int = 200
) -> LogisticModel:
    """Minimize mean BCE + ``l2`` * ||w||^2 / 2 on standardized features (labels 1 = fake)."""
    x = features.float()
    y = labels.float()
    if x.shape[0] == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError("fit_logistic needs at least one row of finite features")
    mean = x.mean(dim=0)
    std = x.std(dim=0).clamp(min=1e-6)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros((), device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LogisticModel(mean, std, weight.detach(), bias.detach())


def fit_platt(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 100) -> tuple[float, float]:
    """(a, b) of ``p = sigmoid(a z + b)`` minimizing BCE on held-out logits, with Platt's
    smoothed targets ((n+ + 1) / (n+ + 2) and 1 / (n- + 2)) against overconfidence."""
    z = logits.float().detach()
    y = labels.float()
    positives, negatives = float(y.sum()), float((1 - y).sum())
    target = torch.where(
        y > 0.5, torch.full_like(y, (positives + 1) / (positives + 2)), torch.full_like(y, 1 / (negatives + 2))
    )
    a = torch.ones((), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([a, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a * z.cpu() + b, target.cpu())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(a.detach()), float(b.detach())


def choose_threshold(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold on p_fake with the best balanced accuracy (ties: the one closest to 0.5)."""
    p = probabilities.float().cpu()
    y = labels.cpu().bool()
    candidates = torch.unique(torch.cat([p, torch.tensor([0.5])]))
    best, best_score = 0.5, -1.0
    for t in candidates.tolist():
        predicted = p >= t
        tpr = (predicted & y).sum() / y.sum().clamp(min=1)
        tnr = (~predicted & ~y).sum() / (~y).sum().clamp(min=1)
        score = float((tpr + tnr) / 2)
        if score > best_score + 1e-12 or (abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_score = t, score
    return best


def average_precision(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over the ranking by score (as scikit-learn)."""
    y = labels.float().cpu()
    if y.numel() == 0 or y.sum() == 0:
        return float("nan")  # undefined without positives
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    y, s = y[order], scores.float().cpu()[order]
    # Group tied scores: precision and recall are taken at the end of each tie.
    distinct = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([len(s) - 1])])
    true_positives = torch.cumsum(y, 0)[distinct]
    predicted = (distinct + 1).float()
    precision = true_positives / predicted
    recall = true_positives / y.sum().clamp(min=1)
    recall_prev = torch.cat([torch.zeros(1), recall[:-1]])
    return float(((recall - recall_prev) * precision).sum())


def auroc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2."""
    y = labels.bool().cpu()
    s = scores.float().cpu()
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.view(-1, 1) > neg.view(1, -1)).float().mean()
    ties = (pos.view(-1, 1) == neg.view(1, -1)).float().mean()
    return float(greater + 0.5 * ties)


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """ECE: mean |accuracy - confidence| over equal-width probability bins, weighted by bin size."""
    p = probabilities.float().cpu()
    y = labels.float().cpu()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (p >= lo) & ((p < hi) | (hi == 1))
        if inside.any():
            total += float(inside.float().mean() * (p[inside].mean() - y[inside].mean()).abs())
    return total
