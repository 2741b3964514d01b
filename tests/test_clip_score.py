"""clip-score: the formulas against open_clip's own API, caption sources, zero-shot, embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import PHOTOS, write_image
from visbatch.cli.main import app
from visbatch.core.models import load_model
from visbatch.core.tasks.clip_score import (
    ClipScoreOptions,
    ClipScoreTask,
    clip_score,
    ref_clip_score,
    zero_shot_probabilities,
)
from visbatch.core.texts import ensemble_text_embeddings

runner = CliRunner()
TINY = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]
PHOTOS = sorted(PHOTOS)  # the order find_images lists them in


def score(*args, expect=0):
    result = runner.invoke(app, ["clip-score", *TINY, *map(str, args)], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def table(path):
    return {r["path"]: r for r in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def tiny():
    return load_model("test-tiny-clip", device="cpu")


def test_scores_equal_open_clip_formula(fixture_images, tmp_path, tiny):
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("test-tiny-clip")
    tokenizer = open_clip.get_tokenizer("test-tiny-clip")
    captions = {p: f"a picture number {i} of something" for i, p in enumerate(PHOTOS)}
    captions_file = tmp_path / "caps.jsonl"
    captions_file.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in captions.items()))
    out = tmp_path / "o.parquet"
    score(fixture_images, "--captions", captions_file, "-o", out, "--batch-size", "3")
    rows = table(out)
    from PIL import Image

    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(fixture_images / p).convert("RGB")) for p in PHOTOS])
        image_e = F.normalize(tiny.module.encode_image(images), dim=-1)
        text_e = F.normalize(tiny.module.encode_text(tokenizer([captions[p] for p in PHOTOS])), dim=-1)
    cosines = (image_e * text_e).sum(-1)
    for i, p in enumerate(PHOTOS):
        assert rows[p]["cosine"] == pytest.approx(cosines[i].item(), abs=1e-5)
        assert rows[p]["clip_score"] == pytest.approx(2.5 * max(cosines[i].item(), 0.0), abs=1e-5)
        assert rows[p]["caption"] == captions[p] and rows[p]["truncated"] is False


def test_clip_score_clips_each_pair_at_zero():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 1.0], [-1.0, 0.2]])
    scores, cosines = clip_score(image, text, weight=2.5)
    assert cosines[0].item() == pytest.approx(2**-0.5)
    assert scores.tolist() == pytest.approx([2.5 * 2**-0.5, 0.0])


def test_ref_clip_score_harmonic_mean():
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    refs = torch.tensor(
        [
            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # best cos = 1/sqrt(2)
            [[0.0, -1.0, 0.0], [9.0, 9.0, 9.0]],  # second is padding (masked): best = -1 -> clipped 0
            [[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    clip_s = torch.tensor([0.8, 0.5, 0.0])
    scores, best = ref_clip_score(clip_s, text, refs, mask)
    a, b = 0.8, 2**-0.5
    assert scores[0].item() == pytest.approx(2 * a * b / (a + b))
    assert best[1].item() == pytest.approx(-1.0) and scores[1].item() == 0.0
    assert scores[2].item() == 0.0  # both terms 0: defined as 0, not NaN


def test_references_from_cli(fixture_images, tmp_path):
    refs = tmp_path / "refs.csv"
    refs.write_text("path,reference\nchelsea.jpg,a cat\nchelsea.jpg,a tabby cat on a sofa\ncoffee.jpg,coffee\n")
    out = tmp_path / "o.parquet"
    score(fixture_images, "--prompt", "a photo", "--references", refs, "-o", out)
    rows = table(out)
    assert rows["chelsea.jpg"]["n_references"] == 2 and rows["coffee.jpg"]["n_references"] == 1
    assert rows["space/rocket.jpg"]["n_references"] == 0 and rows["space/rocket.jpg"]["ref_clip_score"] is None
    c = rows["chelsea.jpg"]
    clipped = max(c["reference_cosine"], 0)
    expected = 0 if c["clip_score"] + clipped == 0 else 2 * c["clip_score"] * clipped / (c["clip_score"] + clipped)
    assert c["ref_clip_score"] == pytest.approx(expected, abs=1e-6)


def test_long_caption_is_truncated_keeping_end_of_text(fixture_images, tmp_path, tiny):
    words = " ".join(f"word{i}" for i in range(300))
    out = tmp_path / "o.parquet"
    result = score(fixture_images / "chelsea.jpg", "--prompt", words, "-o", out, "--json")
    row = table(out)["chelsea.jpg"]
    assert row["truncated"] is True
    assert json.loads(result.stdout.strip().splitlines()[-1])["truncated_captions"] == 1
    tok = tiny.tokenizer
    assert len(tok.encode(words)) > 300
    # The truncated form: start token, the first 75 tokens, end-of-text last.
    ids = [tok.sot_token_id] + tok.encode(words)[:75] + [tok.eot_token_id]
    tokens = torch.tensor([ids])
    from visbatch.core.images import decode_image, pil_to_uint8_chw, resize_and_crop

    img = pil_to_uint8_chw(
        resize_and_crop(decode_image(str(fixture_images / "chelsea.jpg")), tiny.preprocess.geometry)
    )[None]
    with torch.no_grad():
        cos = F.cosine_similarity(tiny.encode_image(tiny.to_input(img)), tiny.encode_text(tokens)).item()
    assert row["cosine"] == pytest.approx(cos, abs=1e-5)
    # Slicing without re-adding end-of-text (torchmetrics' truncation) pools another position.
    with torch.no_grad():
        sliced = tiny.encode_text(torch.tensor([([tok.sot_token_id] + tok.encode(words))[:77]]))
        cos_sliced = F.cosine_similarity(tiny.encode_image(tiny.to_input(img)), sliced).item()
    assert abs(cos_sliced - cos) > 1e-4


def test_same_scores_for_batch_sizes_and_workers(fixture_images, tmp_path):
    outs = []
    for batch, workers in [(1, 0), (64, 2)]:
        out = tmp_path / f"b{batch}.parquet"
        runner.invoke(
            app,
            [
                "clip-score",
                "--model",
                "test-tiny-clip",
                "--device",
                "cpu",
                str(fixture_images),
                "--prompt",
                "a photo",
                "--labels",
                "cat,cup,rocket",
                "-o",
                str(out),
                "--batch-size",
                str(batch),
                "--workers",
                str(workers),
            ],
            catch_exceptions=False,
        )
        outs.append(table(out))
    for path in outs[0]:
        assert outs[0][path]["cosine"] == pytest.approx(outs[1][path]["cosine"], abs=1e-5)
        assert outs[0][path]["top_probs"] == pytest.approx(outs[1][path]["top_probs"], abs=1e-5)


def test_caption_sources_missing_empty_and_orphans(tmp_path):
    root = tmp_path / "imgs"
    for name in ["a.png", "b.png", "c.png", "sub/d.png", "e.png"]:
        write_image(root / name, seed=len(name))
    # Sidecars: .txt, .json with caption, .json without caption, empty .txt.
    (root / "a.txt").write_text("a red square\n")
    (root / "b.json").write_text(json.dumps({"caption": "a blue circle", "url": "x"}))
    (root / "c.json").write_text(json.dumps({"url": "no caption here"}))
    (root / "e.txt").write_text("   ")
    out = tmp_path / "side.parquet"
    score(root, "--sidecar", "-o", out)
    rows = table(out)
    assert rows["a.png"]["caption"] == "a red square" and rows["a.png"]["status"] == "ok"
    assert rows["b.png"]["caption"] == "a blue circle"
    assert rows["c.png"]["status"] == "error" and rows["c.png"]["error"].startswith("no caption")
    assert rows["e.png"]["error"] == "empty caption"
    assert rows["sub/d.png"]["error"].startswith("no caption")

    caps = tmp_path / "caps.csv"
    caps.write_text(
        f"file,text\na.png,first\n{root / 'sub' / 'd.png'},absolute path\nmissing.png,orphan\n"
        "gone/x.jpg,orphan two\nb.png,\na.png,repeated\n"
    )
    out2 = tmp_path / "file.parquet"
    result = score(
        root,
        "--captions",
        caps,
        "--path-column",
        "file",
        "--caption-column",
        "text",
        "--prefix",
        "A photo depicts ",
        "-o",
        out2,
        "--json",
    )
    rows = table(out2)
    assert rows["a.png"]["caption"] == "A photo depicts first"
    assert rows["sub/d.png"]["caption"] == "A photo depicts absolute path"
    assert rows["b.png"]["error"] == "empty caption"
    assert rows["c.png"]["error"] == "no caption"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["captions_without_image"] == 2 and summary["captions_repeated_paths"] == 1
    assert summary["failed"] == 3 and summary["ok"] == 2
    assert "2 rows of --captions name images that do not exist" in result.stderr


def test_each_unique_text_is_encoded_once(tmp_path):
    root = tmp_path / "imgs"
    for i in range(9):
        write_image(root / f"{i}.png", seed=i)
    caps = tmp_path / "caps.tsv"
    caps.write_text("path\tcaption\n" + "".join(f"{i}.png\t{['dog', 'cat', 'cow'][i % 3]}\n" for i in range(9)))
    result = score(root, "--captions", caps, "-o", tmp_path / "o.parquet", "--batch-size", "2", "--json")
    assert json.loads(result.stdout.strip().splitlines()[-1])["texts_encoded"] == 3


def test_zero_shot_probabilities_and_template_ensemble(fixture_images, tmp_path, tiny):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ncoffee\nrocket\nastronaut\n")
    out = tmp_path / "o.parquet"
    templates = ["a photo of a {}.", "a drawing of a {}."]
    score(
        fixture_images,
        "--labels-file",
        labels,
        "--template",
        templates[0],
        "--template",
        templates[1],
        "--save-probs",
        "--top-k",
        "2",
        "-o",
        out,
    )
    rows = table(out)
    for row in rows.values():
        assert sum(row["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert len(row["top_labels"]) == 2 and row["top_probs"][0] >= row["top_probs"][1]
        assert row["top_probs"][0] == pytest.approx(max(row["probs"]), abs=1e-6)
        assert "clip_score" not in row  # labels only: no caption columns
    task = ClipScoreTask(tiny, ClipScoreOptions(labels=["cat", "cup"], templates=templates))
    with torch.no_grad():
        per_template = torch.stack(
            [
                F.normalize(tiny.encode_text(tiny.tokenize([t.format(label) for t in templates])), dim=-1)
                for label in ["cat", "cup"]
            ]
        )
    expected = F.normalize(per_template.mean(dim=1), dim=-1)
    assert torch.allclose(task.class_embeddings, expected, atol=1e-6)
    assert torch.allclose(ensemble_text_embeddings(per_template), expected, atol=1e-6)
    probs = zero_shot_probabilities(torch.randn(5, 32), expected, 100.0)
    assert torch.allclose(probs.sum(-1), torch.ones(5))


def test_save_embeddings_layout(fixture_images, tmp_path):
    out = tmp_path / "o.parquet"
    score(fixture_images, "--prompt", "x", "--save-embeddings", "-o", out)
    t = pq.read_table(out)
    assert str(t.schema.field("image_embedding").type) == "fixed_size_list<element: halffloat>[32]"
    embeddings = np.stack(t.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=2e-3)
    row = table(out)["coffee.jpg"]
    assert row["file_size"] == (fixture_images / "coffee.jpg").stat().st_size
    assert len(row["content_hash"]) == 32 and row["text_embedding"] is not None


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "needs texts"),
        (["--labels", "a,b", "--model", "test-tiny-cnn"], "needs a CLIP model"),
        (["--prompt", "a", "--sidecar"], "one caption source"),
        (["--labels", "cat"], "at least two labels"),
        (["--labels", "a,b", "--template", "no placeholder"], "needs exactly one {}"),
        (["--labels", "a,b", "--template", "{} {}"], "needs exactly one {}"),
        (["--captions", "CAPS", "--caption-column", "nope"], "no column 'nope'"),
        (["--prompt", "a", "--model", "test-tiny-cnn"], "needs a CLIP model"),
        (["--captions", "/no/such.csv"], "file not found"),
    ],
)
def test_usage_errors(fixture_images, tmp_path, args, message):
    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\nchelsea.jpg,x\n")
    args = [str(caps) if a == "CAPS" else a for a in args]
    result = runner.invoke(app, ["clip-score", *TINY, str(fixture_images), "-o", str(tmp_path / "o.parquet"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_default_model_needs_download_and_says_so(fixture_images, tmp_path):
    result = runner.invoke(
        app, ["clip-score", str(fixture_images), "--prompt", "x", "--device", "cpu", "-o", str(tmp_path / "o.parquet")]
    )
    assert result.exit_code == 3
    assert "laion2b_s34b_b79k" in result.stderr and "--pretrained PATH" in result.stderr


def test_trimmed_text_tower_equals_open_clip(tiny):
    from visbatch.core.models.adapters import _encode_text_trimmed

    texts = ["a", "a photo of a cat", " ".join(["long"] * 200), ""]
    tokens = tiny.tokenize(texts)
    assert tiny.encode_text(tokens) is not None and tiny._trim_text is True
    with torch.no_grad():
        full = tiny.module.encode_text(tokens)
        trimmed = _encode_text_trimmed(tiny.module, tokens)
        one_by_one = torch.cat([_encode_text_trimmed(tiny.module, tokens[i : i + 1]) for i in range(len(texts))])
    assert torch.allclose(full, trimmed, atol=1e-5)
    assert torch.allclose(full, one_by_one, atol=1e-5)
