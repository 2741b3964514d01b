"""Misuse, contract 1: no input file is ever modified, moved, replaced or deleted.

Every subcommand is run with each of its outputs aimed at every dangerous
place relative to an input root (the root itself, a folder inside it, a
folder containing it, an alias of it through a symbolic link, an input image,
a sidecar), with ``--overwrite`` so that only the inputs' protection stands
in the way. Each run must be refused (exit 2, one line) or succeed, and the
input tree must come out byte for byte, inode for inode, as it went in.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, invoke_cli, snapshot, write_image

TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """An input root with a name collision (x.jpg, x.png), a sidecar, a subfolder and a link into it."""
    root = tmp_path / "data" / "pool"
    write_image(root / "x.jpg", size=(40, 36), seed=1)
    write_image(root / "x.png", size=(44, 30), seed=2)
    write_image(root / "sub" / "y.jpg", size=(38, 42), seed=3)
    (root / "sub" / "y.txt").write_text("a caption")
    os.symlink(root, tmp_path / "alias")
    return root


def places(pool: Path) -> dict[str, Path]:
    """Where an output must never go, by kind of overlap."""
    return {
        "the root": pool,
        "inside the root": pool / "sub",
        "containing the root": pool.parent,
        "the root through a link": pool.parent.parent / "alias",
        "inside the root through a link": pool.parent.parent / "alias" / "sub",
        "an input image": pool / "x.jpg",
        "an input through a link": pool.parent.parent / "alias" / "x.png",
        "a sidecar": pool / "sub" / "y.txt",
    }


FOLDER_PLACES = [
    "the root",
    "inside the root",
    "containing the root",
    "the root through a link",
    "inside the root through a link",
]
FILE_PLACES = ["the root", "an input image", "an input through a link", "a sidecar", "inside the root"]


def run_and_check(pool: Path, *args) -> None:
    before = snapshot(pool.parent.parent)
    result = invoke_cli(*args)
    assert_one_line_error(result, 2)
    after = snapshot(pool.parent.parent)
    assert after == before, "an input changed"


@pytest.mark.parametrize("place", FILE_PLACES)
@pytest.mark.parametrize(
    "command",
    [
        ["classify", *TINY_CNN],
        ["saliency", *TINY_CNN, "--method", "gradient"],
        ["clip-score", *TINY_CLIP, "--labels", "cat,dog"],
        ["select-data", *TINY_CNN],
    ],
    ids=["classify", "saliency", "clip-score", "select-data"],
)
@pytest.mark.slow
def test_the_parquet_output_never_replaces_an_input(pool, place, command):
    run_and_check(pool, *command, pool, "-o", places(pool)[place], "--overwrite")


@pytest.mark.parametrize("place", FOLDER_PLACES)
@pytest.mark.parametrize(
    "command,option",
    [
        (["classify", *TINY_CNN], "--overlays"),
        (["saliency", *TINY_CNN, "--method", "gradcam"], "--overlays"),
        (["saliency", *TINY_CNN, "--method", "gradcam"], "--save-maps"),
        (["select-data", *TINY_CNN], "--copy-to"),
        (["select-data", *TINY_CNN], "--link-to"),
        (["select-data", *TINY_CNN, "--link", "hardlink"], "--link-to"),
    ],
    ids=["classify-overlays", "saliency-overlays", "saliency-maps", "copy-to", "link-to", "hardlink-to"],
)
@pytest.mark.slow
def test_output_folders_never_overlap_an_input_root(pool, tmp_path, place, command, option):
    run_and_check(pool, *command, pool, "-o", tmp_path / "out.parquet", option, places(pool)[place], "--overwrite")


@pytest.mark.parametrize("place", ["an input image", "a sidecar", "an input through a link"])
def test_the_embedding_cache_never_replaces_an_input(pool, tmp_path, place):
    run_and_check(
        pool,
        "select-data",
        *TINY_CNN,
        pool,
        "-o",
        tmp_path / "o.parquet",
        "--cache",
        places(pool)[place],
        "--overwrite",
    )


def test_a_folder_output_linked_back_into_the_inputs_is_not_written_through(pool, tmp_path):
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    os.symlink(pool / "sub", overlays / "sub")  # a link left in the output folder, leading into the inputs
    before = snapshot(pool)
    result = invoke_cli("classify", *TINY_CNN, pool, "-o", tmp_path / "o.parquet", "--overlays", overlays)
    assert result.exit_code == 0, result.output
    assert snapshot(pool) == before
    import pyarrow.parquet as pq

    rows = {r["path"]: r for r in pq.read_table(tmp_path / "o.parquet").to_pylist()}
    assert rows["sub/y.jpg"]["status"] == "error" and "input folder" in rows["sub/y.jpg"]["error"]
    assert rows["x.jpg"]["status"] == "ok" and (overlays / "x.jpg.png").is_file()


def test_copy_to_never_clobbers_and_skips_identical_files(pool, tmp_path):
    dest = tmp_path / "dest"
    out = tmp_path / "o.parquet"
    assert invoke_cli("select-data", *TINY_CNN, "--no-dedup", pool, "-o", out, "--copy-to", dest).exit_code == 0
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["x.jpg", "x.png", "y.jpg"]
    # Identical files already there: skipped, fine.
    again = invoke_cli("select-data", *TINY_CNN, "--no-dedup", pool, "-o", out, "--overwrite", "--copy-to", dest)
    assert again.exit_code == 0, again.output
    # A different file at a destination: refused before anything (manifest included) is written.
    (dest / "x.jpg").write_bytes(b"the user's own file")
    fresh = tmp_path / "fresh.parquet"
    refused = invoke_cli("select-data", *TINY_CNN, "--no-dedup", pool, "-o", fresh, "--copy-to", dest)
    assert_one_line_error(refused, 2, "pass --overwrite")
    assert (dest / "x.jpg").read_bytes() == b"the user's own file" and not fresh.exists()
    # A destination symlink to an input is replaced, never written through.
    (dest / "x.png").unlink()
    os.symlink(pool / "x.jpg", dest / "x.png")
    before = snapshot(pool)
    assert (
        invoke_cli(
            "select-data", *TINY_CNN, "--no-dedup", pool, "-o", out, "--overwrite", "--copy-to", dest, "--quiet"
        ).exit_code
        == 0
    )
    assert snapshot(pool) == before
    assert (dest / "x.png").read_bytes() == (pool / "x.png").read_bytes() and not (dest / "x.png").is_symlink()


def test_quantize_and_detector_outputs_never_replace_their_inputs(pool, tmp_path):
    from safetensors.torch import save_file

    from visbatch.core.models import load_model

    weights = tmp_path / "data" / "w.safetensors"
    save_file(
        {k: v.contiguous() for k, v in load_model("test-tiny-cnn", device="cpu").module.state_dict().items()},
        str(weights),
    )
    before = snapshot(tmp_path / "data")
    result = invoke_cli(
        "quantize",
        "--model",
        "timm:resnet10t",
        "--pretrained",
        weights,
        "--calib",
        pool,
        "-o",
        weights,
        "--overwrite",
        "--device",
        "cpu",
        "--method",
        "rtn",
    )
    assert_one_line_error(result, 2, "input file")
    labelled = tmp_path / "data" / "labelled"
    for label in ("0_real", "1_fake"):
        for i in range(2):
            write_image(labelled / label / f"{i}.jpg", seed=i)
    before = snapshot(tmp_path / "data")
    for output in (labelled / "0_real" / "0.jpg", weights):
        result = invoke_cli("detect-aigi", "eval", labelled, "--detector", weights, "-o", output, "--overwrite")
        assert_one_line_error(result, 2)
    result = invoke_cli(
        "detect-aigi", "train", labelled, "--features", "npr", "-o", weights, "--overwrite", "--univfd-head", weights
    )
    assert_one_line_error(result, 2, "input file")
    assert snapshot(tmp_path / "data") == before


def test_merge_never_writes_over_a_part(pool, tmp_path):
    for i in range(6):
        write_image(pool / f"more_{i}.jpg", seed=10 + i)
    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}.parquet"
        assert invoke_cli("classify", *TINY_CNN, pool, "--shard", f"{i}/2", "-o", part).exit_code == 0
        parts.append(part)
    before = snapshot(*parts)
    result = invoke_cli("merge", *parts, "-o", parts[0], "--overwrite")
    assert_one_line_error(result, 2, "input file")
    assert snapshot(*parts) == before


names = st.text(alphabet=st.sampled_from("abcXYZ-_. é日"), min_size=1, max_size=6).filter(
    lambda s: not s.startswith(".") and s.strip() == s
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stems=st.lists(names, min_size=1, max_size=4, unique_by=str.lower),
    extensions=st.lists(
        st.sampled_from([".jpg", ".png", ".JPG", ".webp", ".jpeg"]), min_size=2, max_size=3, unique=True
    ),
)
@pytest.mark.slow
def test_generated_names_each_get_their_own_row_and_overlay(tmp_path_factory, stems, extensions):
    root = tmp_path_factory.mktemp("names") / "in"
    for i, stem in enumerate(stems):
        for ext in extensions:
            write_image(root / f"{stem}{ext}", size=(24, 20), seed=i)
    overlays = root.parent / "ov"
    out = root.parent / "o.parquet"
    before = snapshot(root)
    result = invoke_cli("classify", *TINY_CNN, root, "-o", out, "--overlays", overlays, "--overlay-size", "16")
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(stems) * len(extensions) and all(r["status"] == "ok" for r in rows)
    written = sorted(str(p.relative_to(overlays)) for p in overlays.rglob("*.png"))
    assert written == sorted(r["path"] + ".png" for r in rows), "one overlay per input, none shared"
    assert snapshot(root) == before
