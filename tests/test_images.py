"""Finding and decoding images: every input kind, filter and bad-file kind."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import write_image
from visbatch.core.images import (
    Geometry,
    ImageDataset,
    ImageDecodeError,
    InputError,
    _to_rgb,
    collate,
    crop_box,
    decode_image,
    resize_and_crop,
)
from visbatch.core.sources import SourceOptions, find_images, glob_matches, parse_shard, shard_of, walk_folder


def rels(items):
    return [it.relpath for it in items]


# ----------------------------------------------------------------------------- walking


def test_walk_is_sorted_recursive_and_case_insensitive(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.TiFf", "sub/x/d.gif", "notes.txt", "e.jpeg", "f.bmp", "g.webp", "h.tif"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    items = find_images([str(tmp_path)])
    assert rels(items) == ["a.png", "b.JPG", "e.jpeg", "f.bmp", "g.webp", "h.tif", "sub/c.TiFf", "sub/x/d.gif"]
    flat = find_images([str(tmp_path)], SourceOptions(recursive=False))
    assert rels(flat) == ["a.png", "b.JPG", "e.jpeg", "f.bmp", "g.webp", "h.tif"]


def test_hidden_files_and_folders_are_skipped(tmp_path):
    write_image(tmp_path / "ok.png")
    write_image(tmp_path / ".hidden.png")
    write_image(tmp_path / ".cache" / "x.png")
    assert walk_folder(str(tmp_path)) == ["ok.png"]


def test_symlink_loop_does_not_hang(tmp_path):
    write_image(tmp_path / "a" / "img.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a -> .. -> a -> ...
    os.symlink(tmp_path / "a", tmp_path / "a" / "self")
    found = walk_folder(str(tmp_path))
    assert "a/img.png" in found
    assert len(found) == len(set(found)) <= 3


def test_single_files_and_missing_inputs(tmp_path):
    f = write_image(tmp_path / "one.png")
    items = find_images([str(f)])
    assert [(it.root, it.relpath) for it in items] == [(str(tmp_path), "one.png")]
    with pytest.raises(InputError, match="input not found"):
        find_images([str(tmp_path / "nope")])


def test_stdin_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "d" / "a.png")
    write_image(tmp_path / "b.png")
    stream = io.StringIO("d/a.png\n\n  b.png  \n")
    items = find_images(["-"], stdin=stream)
    assert rels(items) == ["b.png", "d/a.png"]
    assert {it.root for it in items} == {str(tmp_path)}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_manifest_formats(tmp_path, fmt):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.png")
    paths = ["imgs/b.png", "imgs/a.png"]
    manifest = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        manifest.write_text("path,caption\n" + "".join(f"{p},x\n" for p in paths))
    elif fmt == "tsv":
        manifest.write_text("path\tcaption\n" + "".join(f"{p}\tx\n" for p in paths))
    elif fmt == "jsonl":
        manifest.write_text("".join(f'{{"path": "{p}"}}\n' for p in paths))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"path": paths}), manifest)
    items = find_images([], manifest=str(manifest))
    assert rels(items) == ["imgs/a.png", "imgs/b.png"]


def test_manifest_without_path_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\na.png\n")
    with pytest.raises(InputError, match="no 'path' column"):
        find_images([], manifest=str(manifest))


def test_glob_include_exclude():
    assert glob_matches("a/b/cat.jpg", ["*.jpg"])
    assert not glob_matches("a/b/cat.png", ["*.jpg"])
    assert not glob_matches("a/b/cat.jpg", ["*.jpg", "!cat*"])
    assert glob_matches("a/b/cat.jpg", ["a/*"])
    assert not glob_matches("a/b/cat.jpg", ["!a/*"])
    assert glob_matches("x/DOG.JPG", ["dog.*"])


def test_limit_applies_after_sort(tmp_path):
    for name in ["c.png", "a.png", "b.png"]:
        write_image(tmp_path / name)
    assert rels(find_images([str(tmp_path)], SourceOptions(limit=2))) == ["a.png", "b.png"]


@settings(max_examples=30, deadline=None)
@given(names=st.sets(st.text("abcdefgh/_-.0123", min_size=1, max_size=12), max_size=60), count=st.integers(1, 7))
def test_shards_partition_any_set(names, count):
    buckets = [{n for n in names if shard_of(n, count) == i} for i in range(count)]
    assert set().union(*buckets) == set(names)
    assert sum(len(b) for b in buckets) == len(names)


def test_shard_option_partitions_folder(image_folder):
    everything = rels(find_images([str(image_folder)]))
    parts = [rels(find_images([str(image_folder)], SourceOptions(shard=(i, 3)))) for i in range(3)]
    assert sorted(sum(parts, [])) == everything
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    # Stable: the same split on every call.
    assert parts[1] == rels(find_images([str(image_folder)], SourceOptions(shard=(1, 3))))


@pytest.mark.parametrize("bad", ["3", "3/3", "-1/2", "a/b", "1/0"])
def test_bad_shard_text(bad):
    with pytest.raises(InputError):
        parse_shard(bad)


# ----------------------------------------------------------------------------- decoding


def test_bad_files_give_clear_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    good = write_image(tmp_path / "good.jpg", size=(200, 200))
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    reasons = {}
    for name in ["empty.jpg", "text.png", "truncated.jpg", "dangling.png"]:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(str(tmp_path / name))
        reasons[name] = str(info.value)
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "not an image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "cannot read file" in reasons["dangling.png"]


def test_decompression_bomb_guard(tmp_path):
    path = write_image(tmp_path / "big.png", size=(300, 200))
    with pytest.raises(ImageDecodeError, match="too large: 300x200"):
        decode_image(str(path), max_pixels=300 * 200 - 1)
    assert decode_image(str(path), max_pixels=300 * 200).size == (300, 200)


def _jpeg_with_orientation(path: Path, orientation: int) -> np.ndarray:
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red, right half blue
    array[:, 20:] = (0, 0, 255)
    img = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=98)
    return array


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 6)  # stored landscape, displayed rotated 90 degrees clockwise
    img = decode_image(str(path))
    assert img.size == (20, 40)
    pixels = np.asarray(img).astype(int)
    # After a clockwise rotation the left (red) half is on top.
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def test_mode_conversion(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 0  # top half fully transparent
    rgba[2:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(decode_image(str(tmp_path / "rgba.png")))
    assert (out[:2] == 255).all(), "transparent pixels composite on white"
    assert (out[2:] == (255, 0, 0)).all()

    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "sixteen.png")
    half = np.full((4, 4), 32896, np.uint16)
    Image.fromarray(half).save(tmp_path / "half16.png")
    assert (np.asarray(decode_image(str(tmp_path / "sixteen.png"))) == 255).all()
    assert (np.asarray(decode_image(str(tmp_path / "half16.png"))) == 128).all()

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = np.asarray(decode_image(str(tmp_path / "cmyk.jpg"))).astype(int)
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1].max() < 60  # red

    for mode in ["P", "L", "LA", "1"]:
        src = write_image(tmp_path / f"m_{mode}.png", mode=mode)
        img = decode_image(str(src))
        assert img.mode == "RGB" and img.size == (48, 40)
    # PNG cannot store PA; PIL produces it in memory (e.g. from palette GIF/WebP frames).
    pa_image = Image.new("P", (4, 4), 1).convert("PA")
    assert _to_rgb(pa_image).mode == "RGB"

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "ptrans.png", transparency=0)
    assert (np.asarray(decode_image(str(tmp_path / "ptrans.png"))) == 255).all()


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    out = np.asarray(decode_image(str(tmp_path / "anim.gif"))).astype(int)
    assert out[..., 0].min() > 200 and out[..., 1].max() < 60


# ----------------------------------------------------------------------------- geometry and dataset


def test_resize_crop_and_box():
    img = Image.new("RGB", (400, 200))
    geometry = Geometry(resize=100, crop=(100, 100))
    assert resize_and_crop(img, geometry).size == (100, 100)
    assert crop_box(400, 200, geometry) == pytest.approx((0.25, 0.0, 0.75, 1.0))
    small = Geometry(resize=0, crop=(64, 64), resize_mode="none")
    assert resize_and_crop(Image.new("RGB", (32, 80)), small).size == (64, 64)
    x0, y0, x1, y1 = crop_box(32, 80, small)
    assert x0 < 0 < 1 < x1 and 0 < y0 < y1 < 1


def test_dataset_yields_error_records_not_exceptions(tmp_path):
    good = write_image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    items = find_images([str(tmp_path)])
    dataset = ImageDataset(items, Geometry(resize=32, crop=(32, 32)), display_size=16)
    batch = collate([dataset[0], dataset[1]])
    assert batch.images.shape == (1, 3, 32, 32) and batch.images.dtype.is_floating_point is False
    assert [r.status for r in batch.records] == ["ok", "error"]
    assert batch.records[0].display.shape[:2] == (13, 16)
    assert batch.records[0].width == 48 and good.exists()


def test_a_file_reachable_by_several_paths_is_listed_under_its_real_path(tmp_path):
    """The same dataset gets the same relative paths (and shard hashes) on every machine."""
    root = tmp_path / "root"
    write_image(root / "real" / "deep" / "a.png")
    write_image(root / "real" / "b.png")
    write_image(tmp_path / "outside" / "c.png")
    # Aliases that sort before the real folder, so a walk that keeps the first one it meets would pick them.
    os.symlink(root / "real", root / "0_alias")
    os.symlink(root / "real" / "deep", root / "1_deep_alias")
    os.symlink(root / "real" / "b.png", root / "2_b_alias.png")
    os.symlink(tmp_path / "outside", root / "3_outside")
    found = walk_folder(str(root))
    assert sorted(found) == ["3_outside/c.png", "real/b.png", "real/deep/a.png"]
    assert walk_folder(str(root)) == found, "deterministic"
