"""visbatch beside Hugging Face ``datasets``: its Parquet exports and ``save_to_disk`` folders
are inputs (images in an Image feature), and visbatch's outputs load as datasets."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE_IMAGES, PHOTOS, invoke_cli

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.slow
TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]


@pytest.fixture
def photos_dataset():
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {
        "image": [str(FIXTURE_IMAGES / name) for name in PHOTOS],
        "caption": [f"a photo of {name}" for name in PHOTOS],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def test_a_parquet_export_and_a_save_to_disk_folder_give_the_same_rows(photos_dataset, tmp_path):
    photos_dataset.to_parquet(str(tmp_path / "export.parquet"))
    photos_dataset.save_to_disk(str(tmp_path / "saved"))
    exported, saved = tmp_path / "a.parquet", tmp_path / "b.parquet"
    result = invoke_cli("classify", tmp_path / "export.parquet", *TINY_CNN, "--keep-columns", "caption", "-o", exported)
    assert result.exit_code == 0, result.output
    result = invoke_cli("classify", tmp_path / "saved", *TINY_CNN, "--keep-columns", "caption", "-o", saved)
    assert result.exit_code == 0, result.output  # a folder of .arrow tables, not "no images found"
    a, b = pq.read_table(exported).to_pylist(), pq.read_table(saved).to_pylist()
    assert [r["status"] for r in a] == [r["status"] for r in b] == ["ok"] * len(PHOTOS)
    assert [r["content_hash"] for r in a] == [r["content_hash"] for r in b]
    assert [r["caption"] for r in b] == [f"a photo of {name}" for name in PHOTOS]
    assert all(r["path"].endswith(".arrow/" + f"{i:09d}") for i, r in enumerate(b))

    loaded = datasets.Dataset.from_parquet(str(exported), cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == len(PHOTOS) and {"path", "status", "top_indices", "caption"} <= set(loaded.column_names)


def test_a_report_of_a_table_run_shows_the_tables_images(photos_dataset, tmp_path):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    (tmp_path / "data").mkdir()
    photos_dataset.to_parquet(str(tmp_path / "data" / "export.parquet"))
    out = tmp_path / "run.parquet"
    assert invoke_cli("classify", tmp_path / "data" / "export.parquet", *TINY_CNN, "-o", out).exit_code == 0
    result = invoke_cli("report", out, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/jpeg") >= len(PHOTOS)  # real thumbnails, not placeholders
