"""detect-aigi: train/score/eval from the CLI, the detector file, UnivFD heads, real generated images."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from conftest import PHOTOS
from visbatch.cli.main import app
from visbatch.core.images import decode_image, pil_to_uint8_chw
from visbatch.core.models import ModelError, load_model
from visbatch.core.tasks.aigi.classifier import average_precision, fit_logistic
from visbatch.core.tasks.aigi.detector import Detector, FeatureExtractor, read_labelled_root, univfd_detector

runner = CliRunner()


def invoke(*args, expect=0):
    result = runner.invoke(app, ["detect-aigi", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


@pytest.fixture(scope="module")
def upsampled_root(tmp_path_factory, fixture_images):
    """ROOT/<generator>/0_real|1_fake: real crops, and the same crops 2x up-sampled two ways."""
    root = tmp_path_factory.mktemp("aigi")
    rng = np.random.default_rng(0)
    kernel = torch.tensor([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    for k, name in enumerate(PHOTOS):
        array = np.asarray(decode_image(str(fixture_images / name)))
        for j in range(3):
            y, x = rng.integers(0, array.shape[0] - 128), rng.integers(0, array.shape[1] - 128)
            crop = array[y : y + 128, x : x + 128]
            small = F.avg_pool2d(torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float(), 2)
            nearest = small.repeat_interleave(2, -2).repeat_interleave(2, -1)
            inserted = torch.zeros(1, 3, 128, 128)
            inserted[..., ::2, ::2] = small
            tconv = F.conv2d(F.pad(inserted, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)
            for generator, fake in (("nearest", nearest), ("tconv", tconv)):
                for label, image in (
                    ("0_real", crop),
                    ("1_fake", fake[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()),
                ):
                    folder = root / generator / label
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(folder / f"{k}_{j}.png")
    return root


@pytest.mark.slow
def test_train_score_eval_round_trip(upsampled_root, tmp_path):
    detector = tmp_path / "det.safetensors"
    report = json.loads(
        invoke(
            "train",
            upsampled_root,
            "--features",
            "npr,bitplane,spectrum",
            "--size",
            "128",
            "-o",
            detector,
            "--device",
            "cpu",
            "--json",
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert report["held_out_ap"] > 0.9 and set(report["per_generator"]) == {"nearest", "tconv"}
    assert (tmp_path / "det.features.parquet").exists()
    loaded = Detector.load(str(detector))
    assert loaded.groups == ("npr", "bitplane", "spectrum") and loaded.policy == "crop" and loaded.backbone is None
    assert 0 < loaded.threshold < 1 and loaded.training["held_out"] >= 6
    out = tmp_path / "eval.parquet"
    invoke("eval", upsampled_root, "--detector", detector, "-o", out, "--device", "cpu", "--min-ap", "0.9")
    rows = {r["generator"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {"nearest", "tconv", "all"}
    assert rows["all"]["n_real"] == 24 and rows["all"]["n_fake"] == 24 and rows["all"]["ap"] > 0.9
    for column in ("auroc", "acc_at_0_5", "acc_at_threshold", "real_acc", "fake_acc"):
        assert 0 <= rows["all"][column] <= 1
    gate = runner.invoke(
        app,
        [
            "detect-aigi",
            "eval",
            str(upsampled_root),
            "--detector",
            str(detector),
            "-o",
            str(out),
            "--overwrite",
            "--device",
            "cpu",
            "--min-ap",
            "1",
        ],
    )
    if rows["all"]["ap"] < 1:
        assert gate.exit_code == 1 and "below --min-ap" in gate.stderr
    else:
        assert gate.exit_code == 0
    impossible = runner.invoke(
        app,
        ["detect-aigi", "eval", str(upsampled_root), "--detector", str(detector), "--min-ap", "1.01"]
        + ["-o", str(tmp_path / "never.parquet")],
    )
    assert impossible.exit_code == 2 and "--min-ap must be between 0 and 1" in impossible.stderr
    assert not (tmp_path / "never.parquet").exists()
    scores = tmp_path / "scores.parquet"
    invoke(
        "score",
        upsampled_root / "tconv",
        "--detector",
        detector,
        "-o",
        scores,
        "--device",
        "cpu",
        "--workers",
        "0",
        "--tta",
        "--heatmaps",
        tmp_path / "maps",
    )
    table = pq.read_table(scores).to_pylist()
    assert len(table) == 24 and {r["label"] for r in table} <= {"real", "fake", "unsure"}
    for r in table:
        logit_share = r["score_npr"] + r["score_bitplane"] + r["score_spectrum"]
        assert np.isfinite(logit_share) and 0 <= r["p_fake_jpeg"] <= 1 and 0 <= r["p_fake_resized"] <= 1
        verdicts = {r[k] >= loaded.threshold for k in ("p_fake", "p_fake_jpeg", "p_fake_resized")}
        assert (r["label"] == "unsure") == (len(verdicts) > 1)
    assert len(list((tmp_path / "maps").rglob("*.png"))) == 24


@pytest.mark.slow
def test_embedding_backbone_is_recorded_and_enforced(upsampled_root, tmp_path):
    detector = tmp_path / "d.safetensors"
    invoke(
        "train",
        upsampled_root / "tconv",
        "--features",
        "embedding,spectrum",
        "--model",
        "test-tiny-cnn",
        "--size",
        "128",
        "-o",
        detector,
        "--device",
        "cpu",
    )
    loaded = Detector.load(str(detector))
    assert loaded.backbone["spec"] == "test-tiny-cnn" and any(n.startswith("emb_") for n in loaded.feature_names)
    ok = runner.invoke(
        app,
        [
            "detect-aigi",
            "score",
            str(upsampled_root / "tconv"),
            "--detector",
            str(detector),
            "-o",
            str(tmp_path / "s.parquet"),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    assert ok.exit_code == 0, ok.output  # the detector's own backbone by default
    wrong = runner.invoke(
        app,
        [
            "detect-aigi",
            "score",
            str(upsampled_root / "tconv"),
            "--detector",
            str(detector),
            "--model",
            "test-tiny-vit",
            "-o",
            str(tmp_path / "t.parquet"),
            "--device",
            "cpu",
        ],
    )
    assert wrong.exit_code == 3 and "trained on backbone test-tiny-cnn" in wrong.stderr
    # The layers group runs the backbone too: it is recorded, and its features named per column.
    layers = tmp_path / "l.safetensors"
    invoke(
        "train",
        upsampled_root / "tconv",
        "--features",
        "layers",
        "--model",
        "test-tiny-cnn",
        "--size",
        "128",
        "-o",
        layers,
        "--device",
        "cpu",
    )
    loaded = Detector.load(str(layers))
    assert loaded.backbone["spec"] == "test-tiny-cnn" and loaded.feature_names[0] == "layers_0"
    assert len(loaded.feature_names) == 64 + 64 + 128 + 256 + 512 + 512  # five stages, then the embedding
    invoke(
        "score",
        upsampled_root / "tconv",
        "--detector",
        layers,
        "-o",
        tmp_path / "l.parquet",
        "--device",
        "cpu",
        "--workers",
        "0",
    )


@pytest.mark.slow
def test_vit_detector_heatmaps_come_from_patch_tokens(upsampled_root, tmp_path):
    detector = tmp_path / "vit.safetensors"
    invoke(
        "train",
        upsampled_root / "tconv",
        "--features",
        "embedding,spectrum",
        "--model",
        "test-tiny-vit",
        "--size",
        "128",
        "-o",
        detector,
        "--device",
        "cpu",
    )
    scores = tmp_path / "s.parquet"
    invoke(
        "score",
        upsampled_root / "tconv" / "1_fake",
        "--detector",
        detector,
        "-o",
        scores,
        "--device",
        "cpu",
        "--workers",
        "0",
        "--heatmaps",
        tmp_path / "maps",
    )
    meta = json.loads(pq.read_schema(scores).metadata[b"visbatch"])
    assert meta["task_options"]["heatmap"] == "ViT patch tokens"
    assert len(list((tmp_path / "maps").rglob("*.png"))) == 12
    # The patch map swaps each patch token's embedding in for the image embedding and keeps the
    # other groups: with every patch equal to the image embedding it is the image's p_fake.
    from visbatch.core.tasks.aigi.score import ScoreTask

    loaded = Detector.load(str(detector))
    backbone = load_model("test-tiny-vit", device="cpu")
    extractor = FeatureExtractor(backbone, loaded.groups)
    task = ScoreTask(loaded, extractor, heatmaps=True)
    pixels = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    features = extractor(pixels)
    width = sum(n.startswith("emb_") for n in loaded.feature_names)
    extractor.patch_embeddings = lambda images: features[:, :width].view(2, 1, 1, width).expand(2, 14, 14, width)
    maps = task._patch_maps(pixels, features)
    p = loaded.probability(features)
    assert maps[0].shape == (14, 14) and np.allclose(maps[0], float(p[0])) and np.allclose(maps[1], float(p[1]))
    cnn = ScoreTask(loaded, FeatureExtractor(load_model("test-tiny-cnn", device="cpu"), loaded.groups), heatmaps=True)
    assert cnn.options()["heatmap"] == "4x4 tiles"


def test_univfd_head_loading(tmp_path):
    tiny = load_model("test-tiny-clip", device="cpu")
    head = tmp_path / "fc_weights.pth"
    torch.save({"weight": torch.randn(1, 32), "bias": torch.zeros(1)}, head)
    detector = univfd_detector(str(head), tiny)
    assert detector.raw_embedding and detector.classifier.weight.shape == (32,)
    torch.save({"fc.weight": torch.randn(1, 768), "fc.bias": torch.zeros(1)}, head)
    with pytest.raises(ModelError, match="768-d features but test-tiny-clip gives 32-d"):
        univfd_detector(str(head), tiny)
    torch.save({"weight": torch.randn(2, 32), "bias": torch.zeros(2)}, head)
    with pytest.raises(ModelError, match=r"expected \[1, D\]"):
        univfd_detector(str(head), tiny)


@pytest.mark.slow
def test_group_pattern_keeps_crops_of_one_photo_out_of_the_held_out_split(fixture_images, tmp_path):
    root = fixture_images.parent / "aigi"
    reports = {}
    for name, extra in (("random", []), ("grouped", ["--group-pattern", r"(.*)_\d+\.jpg$"])):
        out = tmp_path / f"{name}.safetensors"
        result = invoke(
            "train", root, "--features", "spectrum,npr,bitplane", "-o", out, "--device", "cpu", "--json", *extra
        )
        reports[name] = json.loads(result.stdout.strip().splitlines()[-1])
    assert reports["random"]["split_groups"] is None
    assert reports["grouped"]["split_groups"] == 10 + 29  # 10 photos, each generated image its own group
    bad = runner.invoke(
        app,
        [
            "detect-aigi",
            "train",
            str(root),
            "--group-pattern",
            "(",
            "-o",
            str(tmp_path / "x.safetensors"),
            "--features",
            "npr",
        ],
    )
    assert bad.exit_code == 2 and "not a regular expression" in bad.stderr


def test_format_confound_warning_and_bad_detector(tmp_path, upsampled_root):
    root = tmp_path / "mixed"
    for label, fmt in (("0_real", "JPEG"), ("1_fake", "PNG")):
        (root / label).mkdir(parents=True)
        for i, path in enumerate(sorted((upsampled_root / "tconv" / label).glob("*.png"))[:6]):
            Image.open(path).save(root / label / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
    result = runner.invoke(
        app,
        [
            "detect-aigi",
            "train",
            str(root),
            "--features",
            "spectrum",
            "--size",
            "128",
            "-o",
            str(tmp_path / "d.safetensors"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0 and "can learn the file format" in result.stderr
    assert "--normalize-format" in result.stderr
    # eval warns the same, and records it for the report
    evaluation = tmp_path / "e.parquet"
    r = runner.invoke(
        app,
        ["detect-aigi", "eval", str(root), "--detector", str(tmp_path / "d.safetensors"), "-o", str(evaluation)],
    )
    assert r.exit_code == 0 and "can learn the file format" in r.stderr
    meta = json.loads(pq.read_schema(evaluation).metadata[b"visbatch"])
    assert any("can learn the file format" in w for w in meta["confound_warnings"])
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"junk")
    r = runner.invoke(app, ["detect-aigi", "eval", str(root), "--detector", str(bad), "-o", str(tmp_path / "e.pq")])
    assert r.exit_code == 3 and "not a readable safetensors file" in r.stderr
    r = runner.invoke(
        app, ["detect-aigi", "train", "--real", str(root / "0_real"), "-o", str(tmp_path / "y.safetensors")]
    )
    assert r.exit_code == 2 and "--real and --fake" in r.stderr


@pytest.mark.slow
def test_real_generated_images_cross_validated(fixture_images):
    """29 text-to-image outputs against 30 crops of 10 public-domain photos, processed identically.

    Grouped cross-validation: each photo's crops stay in one fold (4 folds, sources dealt round
    robin), repeated over 10 shuffles; chance AP = 29/59 = 0.492. Measured 2026-11-23, mean AP
    (min-max): `layers` (efficientnet-lite0's pooled stage outputs + embedding) 0.665
    (0.557-0.796); artefact groups npr+bitplane+spectrum 0.591 (0.476-0.686); `embedding`
    (penultimate layer only) 0.564 (0.458-0.714). With 10 real sources the embedding learns their
    content, which is why the intermediate stages help.
    """
    data = read_labelled_root(str(fixture_images.parent / "aigi"))
    pixels = torch.stack([pil_to_uint8_chw(decode_image(item.path)) for item in data.items])
    labels = torch.tensor(data.labels)
    sources = [
        item.relpath.split("/")[-1].rsplit("_", 1)[0] if y == 0 else item.relpath
        for item, y in zip(data.items, data.labels)
    ]
    chance = float(labels.float().mean())
    backbone = load_model("efficientnet-lite0", device="cpu")

    def mean_cross_validated_ap(groups) -> float:
        features = FeatureExtractor(backbone, groups)(pixels)
        aps = []
        for repeat in range(10):
            order = sorted(set(sources))
            np.random.default_rng(repeat).shuffle(order)
            fold_of = {source: i % 4 for i, source in enumerate(order)}
            folds = np.array([fold_of[source] for source in sources])
            scores = torch.zeros(len(labels))
            for fold in range(4):
                train, test = folds != fold, folds == fold
                scores[test] = fit_logistic(features[train], labels[train]).logits(features[test])
            aps.append(average_precision(labels, scores))
        return float(np.mean(aps))

    assert mean_cross_validated_ap(("layers",)) > chance + 0.12
    assert mean_cross_validated_ap(("npr", "bitplane", "spectrum")) > chance + 0.06
    assert mean_cross_validated_ap(("embedding",)) > chance + 0.03


def test_tiles_policy_averages_the_tiles_inside_the_image(upsampled_root, tmp_path):
    from types import SimpleNamespace

    from visbatch.core.tasks.aigi.detector import Tiling

    tiling = Tiling(256, 3)  # a 768 px centre square
    wide = SimpleNamespace(width=700, height=500)  # rows: only the middle tile is >= half inside
    small = SimpleNamespace(width=100, height=100)  # smaller than a tile: the centre tile alone
    inside = tiling.inside([wide, small])
    assert inside[0].view(3, 3).tolist() == [[False] * 3, [True] * 3, [False] * 3]
    assert inside[1].nonzero().flatten().tolist() == [4]
    extractor = FeatureExtractor(None, ("spectrum", "npr"), tiling=Tiling(64, 2))
    pixels = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    records = [SimpleNamespace(width=128, height=128), SimpleNamespace(width=128, height=60)]
    features = extractor.image_features(pixels, records)
    tiles = extractor(Tiling(64, 2).split(pixels)).view(2, 4, -1)
    assert torch.allclose(features[0], tiles[0].mean(0), atol=1e-5)
    assert torch.allclose(features[1], tiles[1].mean(0), atol=1e-5)  # 60 px high: each row of tiles half inside
    # Trained and used end to end: 2x2 tiles of 64 px cover these 128 px images at native resolution.
    detector = tmp_path / "tiles.safetensors"
    invoke(
        "train",
        upsampled_root,
        "--features",
        "npr,spectrum",
        "--policy",
        "tiles",
        "--tiles",
        "2",
        "--size",
        "64",
        "-o",
        detector,
        "--device",
        "cpu",
    )
    loaded = Detector.load(str(detector))
    assert loaded.policy == "tiles" and loaded.tiles == 2 and loaded.size == 64
    out = tmp_path / "eval.parquet"
    invoke("eval", upsampled_root, "--detector", detector, "-o", out, "--device", "cpu", "--min-ap", "0.9")
    scores = tmp_path / "s.parquet"
    invoke(
        "score",
        upsampled_root / "nearest",
        "--detector",
        detector,
        "-o",
        scores,
        "--device",
        "cpu",
        "--workers",
        "0",
        "--heatmaps",
        tmp_path / "maps",
        "--tta",
    )
    meta = json.loads(pq.read_schema(scores).metadata[b"visbatch"])
    assert meta["task_options"]["tiles"] == 2 and meta["task_options"]["heatmap"].startswith("2x2 tiles of 64 px")
    assert len(list((tmp_path / "maps").rglob("*.png"))) == 24


def test_format_1_detector_still_loads_and_scores_the_same(upsampled_root, tmp_path):
    """A detector written before per-group fusion (format 1: one regression) loads and scores as it did."""
    from safetensors.torch import load_file, save_file

    from visbatch.core.tasks.aigi.classifier import LogisticModel

    names = [f"npr_{i}" for i in range(4)]
    model = LogisticModel(torch.zeros(4), torch.ones(4), torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor(0.3))
    v2 = tmp_path / "v2.safetensors"
    Detector(model, ("npr",), names, (1.5, -0.2), 0.5, "crop", 128, None).save(str(v2))
    from safetensors import safe_open

    with safe_open(str(v2), framework="pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    del config["classifier"]
    v1 = tmp_path / "v1.safetensors"
    save_file(load_file(str(v2)), str(v1), metadata={**metadata, "format_version": "1", "config": json.dumps(config)})
    x = torch.randn(5, 4)
    old, new = Detector.load(str(v1)), Detector.load(str(v2))
    assert torch.allclose(old.probability(x), new.probability(x))
    assert torch.allclose(old.probability(x), torch.sigmoid(1.5 * (x @ model.weight + 0.3) - 0.2))
    # A file whose tensors do not match its feature names is refused, not scored.
    save_file({**load_file(str(v2)), "weight": torch.zeros(3)}, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ModelError, match="damaged detector"):
        Detector.load(str(tmp_path / "bad.safetensors"))


def test_fused_detector_shares_sum_to_its_logit(upsampled_root, tmp_path):
    """Per-group scores are each group's term of the fused logit: they add up to it (with the bias)."""
    detector = tmp_path / "det.safetensors"
    invoke(
        "train",
        upsampled_root,
        "--features",
        "npr,bitplane,spectrum",
        "--size",
        "128",
        "-o",
        detector,
        "--device",
        "cpu",
        "--keep-all-groups",
    )
    loaded = Detector.load(str(detector))
    x = torch.randn(6, len(loaded.feature_names))
    shares = loaded.group_scores(x)
    assert set(shares) == {"npr", "bitplane", "spectrum"}
    a, b = loaded.platt
    total = sum(shares.values()) + a * loaded.classifier.fusion.bias + b
    assert torch.allclose(torch.sigmoid(total), loaded.probability(x), atol=1e-5)


def test_bad_training_options_are_usage_errors(tmp_path):
    for extra, fragment in ((["--features", "npr,npr"], "twice"), (["--l2", "inf"], "finite")):
        result = runner.invoke(
            app, ["detect-aigi", "train", str(tmp_path), "-o", str(tmp_path / "d.safetensors"), *extra]
        )
        assert result.exit_code == 2 and fragment in result.stderr, result.output
    assert not list(tmp_path.iterdir())


def test_detector_with_non_finite_calibration_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from visbatch.core.tasks.aigi.classifier import LogisticModel

    good = tmp_path / "good.safetensors"
    model = LogisticModel(torch.zeros(4), torch.ones(4), torch.ones(4), torch.tensor(0.0))
    Detector(model, ("npr",), [f"npr_{i}" for i in range(4)], (1.0, 0.0), 0.5, "crop", 128, None).save(str(good))
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    for key, value in (("threshold", float("nan")), ("platt", [float("nan"), 0.0])):
        bad = tmp_path / f"bad_{key}.safetensors"
        save_file(load_file(str(good)), str(bad), metadata={**metadata, "config": json.dumps({**config, key: value})})
        with pytest.raises(ModelError, match="damaged detector"):
            Detector.load(str(bad))
