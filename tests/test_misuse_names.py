"""Names from the inputs that climb out, umask on every written file, and refusals found by review."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import assert_one_line_error, invoke_cli, snapshot, write_image

TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]


def _jpeg(tmp_path: Path, seed: int) -> bytes:
    path = write_image(tmp_path / f"src{seed}.jpg", seed=seed)
    data = path.read_bytes()
    path.unlink()
    return data


def test_tar_members_that_climb_out_are_error_rows_and_write_nothing_outside(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.png").write_text("precious")
    shard = tmp_path / "deep" / "er" / "trav.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for name, seed in (("../../../victim/notes.jpg", 1), ("/abs/x.jpg", 2), ("fine.jpg", 3)):
            info = tarfile.TarInfo(name)
            data = _jpeg(tmp_path, seed)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = snapshot(victim)
    out, overlays = tmp_path / "o.parquet", tmp_path / "ov"
    result = invoke_cli("saliency", shard, *TINY_CNN, "--method", "gradient", "-o", out, "--overlays", overlays)
    assert result.exit_code == 0, result.stderr
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    climbing = [r for p, r in rows.items() if ".." in p or "/abs/" in p]
    assert len(climbing) == 2 and all("leaves the shard" in r["error"] for r in climbing)
    assert rows["trav.tar/fine"]["status"] == "ok"
    assert snapshot(victim) == before and (victim / "notes.png").read_text() == "precious"
    written = {p for p in tmp_path.rglob("*.png")} - {victim / "notes.png"}
    assert all(overlays in p.parents for p in written), written


def test_a_sink_refuses_a_key_that_leaves_its_folder(tmp_path):
    import numpy as np

    from visbatch.core.overlays import FolderSink, SinkWriteError
    from visbatch.core.sources import ImageItem

    sink = FolderSink(str(tmp_path / "ov"), "overlay", [str(tmp_path / "in")])
    try:
        future = sink.submit(ImageItem(str(tmp_path / "in"), "../../escape.jpg"), np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(SinkWriteError, match="leaves the output folder"):
            future.result()
    finally:
        sink.close()
    assert not (tmp_path / "escape.jpg.png").exists() and not list(tmp_path.rglob("escape*"))


@pytest.mark.slow
def test_files_of_quantize_and_detect_aigi_honour_the_umask(tmp_path):
    calib = tmp_path / "calib"
    for n in range(4):
        write_image(calib / f"{n}.jpg", seed=n)
    previous = os.umask(0o002)
    try:
        result = invoke_cli(
            "quantize", "--calib", calib, *TINY_CNN[:4], "--method", "rtn", "-o", tmp_path / "q.safetensors"
        )
        assert result.exit_code == 0, result.stderr
        for name in ("q.safetensors", "q.report.parquet"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o664, name
    finally:
        os.umask(previous)


def test_review_refusals_create_nothing(tmp_path):
    real, fake = tmp_path / "real", tmp_path / "fake"
    for n in range(3):
        write_image(real / f"{n}.png", seed=n)
        write_image(fake / f"{n}.png", seed=10 + n)
    before = snapshot(real, fake)
    detector = tmp_path / "d.safetensors"
    train = ["detect-aigi", "train", "--real", real, "--features", "npr", "--device", "cpu", "-o", detector]
    assert_one_line_error(invoke_cli(*train, "--fake", fake, "--group-pattern", "("), 2, "--group-pattern")
    assert_one_line_error(invoke_cli(*train, "--fake", real), 2, "same folder")
    assert_one_line_error(invoke_cli(*train, "--fake", fake, "--size", "10000"), 2, "--size")
    (tmp_path / "a_file").write_text("x")
    under_a_file = ["-o", tmp_path / "a_file" / "d.safetensors"]
    assert_one_line_error(invoke_cli(*train[:-2], "--fake", fake, *under_a_file), 3, "not a folder")
    (tmp_path / "a_file").unlink()
    assert_one_line_error(
        invoke_cli("classify", tmp_path / "nope" / "{00000..00003}.tar", *TINY_CNN, "-o", tmp_path / "x.parquet"),
        2,
        "none of the 4 names",
    )
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("real", "fake"))
    assert leftovers == [], leftovers
    assert snapshot(real, fake) == before


def test_a_folder_of_images_and_tars_says_the_tars_were_not_read(tmp_path):
    folder = tmp_path / "mixed"
    write_image(folder / "a.jpg", seed=1)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        data = _jpeg(tmp_path, 2)
        info = tarfile.TarInfo("000000000.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = invoke_cli("classify", folder, *TINY_CNN, "-o", tmp_path / "o.parquet", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == 1 and any(".tar files were not read" in w for w in summary["warnings"]), summary


@pytest.mark.slow
def test_a_second_sigterm_while_shutting_down_keeps_exit_130(tmp_path):
    import signal
    import subprocess
    import time

    from conftest import VISBATCH

    root = tmp_path / "many"
    for i in range(300):
        write_image(root / f"{i:03d}.jpg", size=(40, 40), seed=i)
    out = tmp_path / "o.parquet"
    proc = subprocess.Popen(
        [*VISBATCH, "classify", str(root), *TINY_CNN, "-o", str(out), "--batch-size", "2", "-q"],
        stderr=subprocess.PIPE,
        text=True,
    )
    parts = tmp_path / "o.parquet.parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*.arrow"))) < 2 and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    # The event: the run has released its output (the lock file goes last), so Python is
    # shutting down; the second signal lands then, or finds the process gone.
    lock = tmp_path / "o.parquet.lock"
    while time.monotonic() < deadline and lock.exists() and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 130, proc.stderr.read()


def test_tar_members_of_no_sample_are_named_in_a_warning(tmp_path):
    shard = tmp_path / "odd.tar"
    data = _jpeg(tmp_path, 4)
    with tarfile.open(shard, "w") as tar:
        for name in ("noext", ".hidden.jpg", "000.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "000.jpg"
        tar.addfile(link)
    result = invoke_cli("classify", shard, *TINY_CNN, "-o", tmp_path / "o.parquet", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == 1
    assert any("3 members belong to no sample" in w for w in summary["warnings"]), summary["warnings"]
