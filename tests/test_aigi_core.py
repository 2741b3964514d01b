"""detect-aigi's maths: artefact features on controlled inputs, calibration, AP/AUROC parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import PHOTOS
from visbatch.core.images import decode_image
from visbatch.core.tasks.aigi.classifier import (
    auroc,
    average_precision,
    choose_threshold,
    expected_calibration_error,
    fit_logistic,
    fit_platt,
)
from visbatch.core.tasks.aigi.features import bitplane_features, npr_features, spectrum_features


@pytest.fixture(scope="module")
def crops(fixture_images):
    """16 real 128x128 crops (uint8 [16, 3, 128, 128]) from the committed photos."""
    rng = np.random.default_rng(0)
    out = []
    for name in PHOTOS:
        array = np.asarray(decode_image(str(fixture_images / name)))
        for _ in range(4):
            y, x = rng.integers(0, array.shape[0] - 128), rng.integers(0, array.shape[1] - 128)
            out.append(torch.from_numpy(array[y : y + 128, x : x + 128].copy()).permute(2, 0, 1))
    return torch.stack(out)


def nearest_upsampled(pixels):
    """A 2x nearest-neighbour up-sampling of each crop's half-resolution version."""
    small = F.avg_pool2d(pixels.float(), 2)
    return small.repeat_interleave(2, -2).repeat_interleave(2, -1).round().clamp(0, 255).to(torch.uint8)


def transposed_conv_like(pixels):
    """Zero insertion then a fixed 3x3 smoothing kernel: the checkerboard of transposed convolutions."""
    small = F.avg_pool2d(pixels.float(), 2)
    up = torch.zeros(small.shape[0], 3, small.shape[2] * 2, small.shape[3] * 2)
    up[..., ::2, ::2] = small
    kernel = torch.tensor([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(F.pad(up, (1, 1, 1, 1), mode="reflect"), kernel, groups=3).round().clamp(0, 255).to(torch.uint8)


def test_npr_separates_upsampled_from_camera_images(crops):
    real = npr_features(crops.float() / 255)
    fake = npr_features(nearest_upsampled(crops).float() / 255)
    # One 2x2 phase of a nearest-upsampled image reproduces itself exactly.
    # Measured 2026-11-23: real crops 0.74-0.81, nearest-upsampled 0.
    assert (fake[:, 2] < 1e-6).all() and (real[:, 2] > 0.5).all(), (real[:, 2], fake[:, 2])


def test_spectrum_shows_interpolating_upsampling(crops):
    # Zero insertion + a smoothing kernel (transposed-convolution-like) leaves a notch at 1/2 cycle per
    # pixel. Measured 2026-11-23 on 16 crops: real log ratio -0.58 to 1.15; upsampled -5.0 to -0.34,
    # 15 of 16 below every real crop (the exception is a flat patch of sky with no high frequencies).
    real = spectrum_features(crops.float() / 255)[:, :2].mean(dim=1)
    fake = spectrum_features(transposed_conv_like(crops).float() / 255)[:, :2].mean(dim=1)
    assert (fake < real.min()).float().mean() >= 0.9 and fake.median() < real.min() - 2.0, (fake, real)


def test_bitplanes_of_noise_and_of_smooth_images():
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (4, 3, 64, 64), generator=rng, dtype=torch.uint8)
    smooth = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 1, 64).expand(4, 3, 64, 64)
    noisy_features, smooth_features = bitplane_features(noise), bitplane_features(smooth)
    assert torch.allclose(noisy_features[:, 1:], torch.full_like(noisy_features[:, 1:], 0.5), atol=0.03)
    assert (smooth_features[:, 2] > 0.99).all()  # vertical neighbours identical in a horizontal ramp


@pytest.mark.slow
def test_ap_and_auroc_match_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(1)
    for _ in range(5):
        labels = rng.integers(0, 2, 200)
        scores = np.round(labels * 0.8 + rng.normal(size=200), 1)  # rounded: many ties
        assert average_precision(torch.from_numpy(labels), torch.from_numpy(scores)) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-6
        )
        assert auroc(torch.from_numpy(labels), torch.from_numpy(scores)) == pytest.approx(
            roc_auc_score(labels, scores), abs=1e-6
        )


def test_eval_curves_match_scikit_learn_and_figures_are_consistent():
    from sklearn.metrics import precision_recall_curve, roc_curve

    from visbatch.core.images import ImageItem
    from visbatch.core.tasks.aigi.figures import eval_figures, roc_pr_points

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels * 0.8 + rng.normal(size=300), 1)  # many ties
    points = roc_pr_points(labels, scores, limit=None)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(points["roc"]["fpr"], fpr, atol=1e-6) and np.allclose(points["roc"]["tpr"], tpr, atol=1e-6)
    precision, recall, _ = precision_recall_curve(
        labels, scores
    )  # lowest threshold first, (recall 0, precision 1) last
    assert np.allclose(points["pr"]["recall"], recall[::-1], atol=1e-6)
    assert np.allclose(points["pr"]["precision"], precision[::-1], atol=1e-6)
    thinned = roc_pr_points(labels, scores)
    assert len(thinned["roc"]["fpr"]) <= 101 and thinned["roc"]["tpr"][-1] == 1.0
    assert roc_pr_points(np.zeros(5, dtype=int), np.arange(5.0)) == {}  # one class: no curve

    p = 1 / (1 + np.exp(-scores))
    items = [ImageItem("/root", f"{i}.png") for i in range(300)]
    generators = ["a" if i % 2 else "b" for i in range(300)]
    figures = eval_figures(items, labels, generators, p, 0.6)
    assert set(figures["curves"]) == {"a", "b", "all"}
    assert sum(figures["confusion"][k] for k in figures["confusion"] if k != "threshold") == 300
    assert sum(b["count"] for b in figures["reliability"]) == 300
    wrong = figures["worst_errors"]
    assert wrong and all((e["p_fake"] >= 0.6) != (e["label"] == "fake") for e in wrong)
    errors = [abs((e["label"] == "fake") - e["p_fake"]) for e in wrong]
    assert errors == sorted(errors, reverse=True)
    assert all(e["label"] == "fake" for e in figures["most_confident_fakes"])
    fakes = [e["p_fake"] for e in figures["most_confident_fakes"]]
    assert fakes == sorted(fakes, reverse=True) and fakes[0] == p[labels == 1].max().round(6)


def test_logistic_platt_and_threshold_on_imbalanced_data():
    generator = torch.Generator().manual_seed(0)

    def sample(n_real, n_fake):
        real = torch.randn(n_real, 6, generator=generator)
        fake = torch.randn(n_fake, 6, generator=generator) + torch.tensor([1.2, 0.8, 0, 0, 0, 0])
        return torch.cat([real, fake]) * 5 + 3, torch.cat([torch.zeros(n_real), torch.ones(n_fake)])

    x_train, y_train = sample(600, 200)
    x_held, y_held = sample(600, 200)
    x_test, y_test = sample(3000, 1000)
    model = fit_logistic(x_train, y_train)
    a, b = fit_platt(model.logits(x_held), y_held)
    p_test = torch.sigmoid(a * model.logits(x_test) + b)
    # Calibrated: expected calibration error on unseen data under 0.05 (measured 2026-11-23: 0.008;
    # AUROC 0.84, threshold 0.18).
    assert expected_calibration_error(p_test, y_test) < 0.05
    assert auroc(y_test, p_test) > 0.8
    threshold = choose_threshold(torch.sigmoid(a * model.logits(x_held) + b), y_held)
    # With 3 real images per fake, balanced accuracy puts the threshold well below 0.5.
    assert threshold < 0.4
    assert torch.allclose(model.contributions(x_test).sum(1) + model.bias, model.logits(x_test), atol=1e-4)


def test_grouped_split_keeps_each_group_on_one_side():
    from visbatch.core.tasks.aigi.detector import stratified_split

    labels = [0] * 12 + [1] * 8
    groups = [f"photo{i // 3}" for i in range(12)] + [f"fake{i}" for i in range(8)]
    for seed in range(5):
        train, held = stratified_split(labels, 0.25, seed, groups)
        assert set(train) | set(held) == set(range(20)) and not set(train) & set(held)
        held_groups = {groups[i] for i in held}
        assert not held_groups & {groups[i] for i in train}
        assert {labels[i] for i in held} == {0, 1} and {labels[i] for i in train} == {0, 1}
        assert sum(labels[i] == 0 for i in held) == 3  # one whole photo: 3 of 12 real
