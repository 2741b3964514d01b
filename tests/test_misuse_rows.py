"""Misuse, contract 3: every row is true, every file honours the umask, sinks fail loudly.

A row is ``ok`` with finite values or ``error`` with a reason, over a corpus
of awkward files (flat, tiny, extreme aspect, odd modes, broken, a name that
is not UTF-8), in every subcommand. A file that could not be written makes
its row an error (or, for a full disk, stops the run resumably with exit 3).
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import VISBATCH, assert_one_line_error, invoke_cli, write_image

TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]
BAD_NAME = os.fsdecode(b"bad\xff name.jpg")


def _huge_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` and whose data is cut short."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    row = zlib.compress(b"\x00" + b"\x80" * (3 * width))  # the first scanline only
    idat = b"IDAT" + row
    data += struct.pack(">I", len(row)) + idat + struct.pack(">I", zlib.crc32(idat))
    path.write_bytes(data)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("awkward") / "in"
    root.mkdir()
    for name, colour in (("black.png", 0), ("grey.jpg", 128), ("white.gif", 255)):
        Image.new("RGB", (64, 64), (colour,) * 3).save(root / name)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.new("RGB", (600, 2), (10, 200, 10)).save(root / "sliver.png")
    write_image(root / "cmyk.jpg", mode="CMYK", size=(40, 30), seed=4)
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)).save(root / "deep16.png")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.save(root / "transparent.png")
    write_image(root / "ok.jpg", seed=5)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / "ok.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(good[: len(good) // 2])
    _huge_png_header(root / "huge.png", 20000, 20000)
    write_image(root / BAD_NAME, seed=6)
    return root


def assert_rows_true(path: Path, expected: int) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == expected
    for row in rows:
        assert row["status"] in ("ok", "error")
        if row["status"] == "error":
            assert row["error"], row
            continue
        for key, value in row.items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, float):
                    assert math.isfinite(v), (row["path"], key, v)
    return rows


COMMANDS = {
    "classify": ["classify", *TINY_CNN],
    "saliency-gradcam": ["saliency", *TINY_CNN, "--method", "gradcam", "--eval", "--eval-steps", "3"],
    "saliency-ig": ["saliency", *TINY_CNN, "--method", "integrated-gradients", "--steps", "4"],
    "clip-score": ["clip-score", *TINY_CLIP, "--labels", "cat,dog", "--prompt", "a photo", "--save-embeddings"],
    "select-data": ["select-data", *TINY_CNN],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_row_is_ok_and_finite_or_an_error_with_a_reason(awkward, tmp_path, name):
    out = tmp_path / "o.parquet"
    result = invoke_cli(*COMMANDS[name], awkward, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in assert_rows_true(out, len(os.listdir(awkward)))}
    for broken in ("empty.jpg", "text.png", "cut.jpg"):
        assert rows[broken]["status"] == "error"
    assert rows["huge.png"]["status"] == "error" and "--max-pixels" in rows["huge.png"]["error"]
    for fine in ("black.png", "grey.jpg", "white.gif", "one_pixel.png", "sliver.png", "cmyk.jpg", "deep16.png"):
        assert rows[fine]["status"] == "ok", rows[fine]
    bad = rows["bad\\xff name.jpg"]
    assert bad["status"] == "ok" and os.fsdecode(bad["path_bytes"]) == BAD_NAME
    assert bad["content_hash"] and bad["file_size"] == os.path.getsize(awkward / BAD_NAME)


def test_max_pixels_governs_pils_own_limit(awkward, tmp_path, monkeypatch):
    # PIL refuses images over its own limit with its own message; visbatch's --max-pixels is the only
    # limit. PIL's is lowered here to 10 pixels so that a small image stands for a huge one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, awkward / "ok.jpg", "-o", out, "--max-pixels", "0").exit_code == 0
    assert pq.read_table(out).to_pylist()[0]["status"] == "ok"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    invoke_cli("classify", *TINY_CNN, awkward / "ok.jpg", "-o", out, "--max-pixels", "100", "--overwrite")
    row = pq.read_table(out).to_pylist()[0]
    assert row["status"] == "error" and "--max-pixels 100" in row["error"] and "DecompressionBomb" not in row["error"]


def test_flat_images_get_finite_fake_probabilities(tmp_path):
    root = tmp_path / "train"
    for i in range(4):
        write_image(root / "0_real" / f"r{i}.png", size=(64, 64), seed=i)
        img = Image.fromarray(np.asarray(Image.open(root / "0_real" / f"r{i}.png"))[::2, ::2]).resize((64, 64))
        (root / "1_fake").mkdir(parents=True, exist_ok=True)
        img.save(root / "1_fake" / f"f{i}.png")
    Image.new("RGB", (64, 64), (128,) * 3).save(root / "0_real" / "grey.png")  # a flat image in training
    detector = tmp_path / "d.safetensors"
    result = invoke_cli(
        "detect-aigi",
        "train",
        root,
        "--features",
        "npr,bitplane,spectrum",
        "--size",
        "32",
        "--device",
        "cpu",
        "-o",
        detector,
    )
    assert result.exit_code == 0, result.output
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, colour in (("black.png", 0), ("grey.jpg", 128), ("white.gif", 255)):
        Image.new("RGB", (48, 48), (colour,) * 3).save(flat / name)
    out = tmp_path / "s.parquet"
    assert (
        invoke_cli(
            "detect-aigi", "score", flat, "--detector", detector, "--device", "cpu", "--workers", "0", "-o", out
        ).exit_code
        == 0
    )
    for row in assert_rows_true(out, 3):
        assert row["status"] == "ok" and 0 <= row["p_fake"] <= 1


@pytest.mark.slow
def test_a_non_utf8_name_on_stdin_is_one_row(awkward, tmp_path):
    out = tmp_path / "o.parquet"
    paths = os.fsencode(str(awkward / BAD_NAME)) + b"\n" + os.fsencode(str(awkward / "ok.jpg")) + b"\n"
    result = subprocess.run(
        [*VISBATCH, "classify", *TINY_CNN, "-", "-o", str(out), "--quiet"],
        input=paths,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = assert_rows_true(out, 2)
    assert {r["status"] for r in rows} == {"ok"}


def test_random_weights_are_never_silent(awkward, tmp_path):
    for command in (COMMANDS["clip-score"], COMMANDS["select-data"]):
        result = invoke_cli(*command, awkward / "ok.jpg", "-o", tmp_path / f"{command[0]}.parquet", "--json")
        assert result.exit_code == 0, result.output
        assert "random weights" in result.stderr
        assert any("random weights" in w for w in json.loads(result.stdout.strip().splitlines()[-1])["warnings"])


def test_manifest_rows_without_a_path_are_counted(awkward, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"path": str(awkward / "ok.jpg")})
        + "\n"
        + json.dumps({"path": None})
        + "\n"
        + json.dumps({"other": 1})
        + "\n"
    )
    result = invoke_cli("classify", *TINY_CNN, "--manifest", manifest, "-o", tmp_path / "o.parquet", "--json")
    assert result.exit_code == 0, result.output
    assert "2 rows of --manifest" in result.stderr and "rows 2, 3" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_every_output_honours_the_umask(awkward, tmp_path, mask):
    previous = os.umask(mask)
    try:
        out = tmp_path / "o.parquet"
        assert (
            invoke_cli(
                "saliency",
                *TINY_CNN,
                "--method",
                "gradcam",
                awkward / "ok.jpg",
                "-o",
                out,
                "--overlays",
                tmp_path / "ov",
                "--save-maps",
                tmp_path / "maps",
            ).exit_code
            == 0
        )
        assert (
            invoke_cli(
                "select-data",
                *TINY_CNN,
                awkward / "ok.jpg",
                "-o",
                tmp_path / "s.parquet",
                "--copy-to",
                tmp_path / "copy",
            ).exit_code
            == 0
        )
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert len(files) >= 6
        for path in files:
            if path.parent.name == "copy":
                continue  # copies keep the bytes and time of the input; their mode is the umask's too
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
        assert (tmp_path / "copy" / "ok.jpg").stat().st_mode & 0o777 == 0o666 & ~mask
    finally:
        os.umask(previous)


def test_an_overlay_that_cannot_be_written_fails_its_row(awkward, tmp_path, monkeypatch):
    import visbatch.core.overlays as overlays_module

    real = overlays_module.atomic_write_bytes

    def refuse_one(path, data, **kwargs):
        if "grey" in str(path):
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        real(path, data, **kwargs)

    monkeypatch.setattr(overlays_module, "atomic_write_bytes", refuse_one)
    out = tmp_path / "o.parquet"
    result = invoke_cli(
        "classify",
        *TINY_CNN,
        awkward / "grey.jpg",
        awkward / "ok.jpg",
        "-o",
        out,
        "--overlays",
        tmp_path / "ov",
        "--fail-on-error",
    )
    assert result.exit_code == 1, result.output
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["grey.jpg"]["status"] == "error" and "overlay not written" in rows["grey.jpg"]["error"]
    assert rows["grey.jpg"]["top_labels"] is None and rows["ok.jpg"]["status"] == "ok"
    assert "1 written" in result.stderr


def test_a_full_disk_stops_the_run_resumably(awkward, tmp_path, monkeypatch):
    import visbatch.core.overlays as overlays_module

    real = overlays_module.atomic_write_bytes

    def disk_full(path, data, **kwargs):
        if "ok.jpg" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, **kwargs)

    monkeypatch.setattr(overlays_module, "atomic_write_bytes", disk_full)
    out = tmp_path / "o.parquet"
    inputs = [awkward / n for n in ("black.png", "grey.jpg", "ok.jpg", "white.gif")]
    args = ["classify", *TINY_CNN, *inputs, "-o", out, "--overlays", tmp_path / "ov", "--batch-size", "1"]
    result = invoke_cli(*args)
    assert_one_line_error(result, 3, "No space left on device")
    assert "ok.jpg" in result.stderr and not out.exists()
    assert not [p for p in (tmp_path).rglob("*.tmp")], "no temp files left"
    monkeypatch.setattr(overlays_module, "atomic_write_bytes", real)
    resumed = invoke_cli(*args, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    rows = assert_rows_true(out, 4)
    assert all(r["status"] == "ok" for r in rows) and len(list((tmp_path / "ov").rglob("*.png"))) == 4


def test_a_parquet_write_failure_names_the_file_and_cleans_up(awkward, tmp_path, monkeypatch):
    import visbatch.core.outputs as outputs_module

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs_module.pq, "ParquetWriter", no_space)
    out = tmp_path / "o.parquet"
    result = invoke_cli("classify", *TINY_CNN, awkward / "ok.jpg", "-o", out)
    assert_one_line_error(result, 3, "o.parquet")
    assert "No space left" in result.stderr
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    assert (tmp_path / "o.parquet.parts").is_dir(), "the parts stay for --resume"


@pytest.mark.slow
@pytest.mark.slow
def test_sigterm_mid_run_is_exit_130_and_quiet_with_q(tmp_path):
    import signal
    import time

    root = tmp_path / "in"
    for i in range(400):
        write_image(root / f"{i:03d}.jpg", size=(64, 64), seed=i)
    out = tmp_path / "o.parquet"
    proc = subprocess.Popen(
        [
            *VISBATCH,
            "saliency",
            *TINY_CNN,
            str(root),
            "-o",
            str(out),
            "--method",
            "rise",
            "--masks",
            "64",
            "--batch-size",
            "2",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    parts = tmp_path / "o.parquet.parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(parts.glob("part-*.arrow")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr == "" and stdout == ""
    assert sys.platform != "win32"


def test_a_pool_of_only_unreadable_files_gives_error_rows_not_a_crash(tmp_path):
    """select-data over nothing embeddable: every image an error row (exit 0), as classify gives."""
    pool = tmp_path / "broken"
    pool.mkdir()
    (pool / "a.png").write_bytes(b"x")
    (pool / "b.jpg").write_bytes(b"")
    (pool / "c.gif").write_bytes(b"GIF89a")
    out = tmp_path / "m.parquet"
    result = invoke_cli("select-data", pool, *TINY_CNN, "-o", out)
    assert result.exit_code == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["reason"] for r in rows] == ["error"] * 3 and all(r["error"] for r in rows)
    assert not any(r["selected"] for r in rows)


def test_quantize_counts_only_the_images_it_decoded(tmp_path):
    calib = tmp_path / "calib"
    for n in range(6):
        write_image(calib / f"{n}.png", seed=n)
    (calib / "bad.png").write_bytes(b"not an image")
    (calib / "empty.jpg").write_bytes(b"")
    result = invoke_cli(
        "quantize", "--calib", calib, *TINY_CNN, "--method", "rtn", "-o", tmp_path / "q.safetensors", "--json"
    )
    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["unreadable_images"] == 2 and "not used:" in result.stderr
    assert figures["calibration_images"] + figures["eval_images"] == 6  # the 6 decodable images, nothing more
