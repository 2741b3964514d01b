"""Misuse, contract 4: a resumed run never mixes options, never keeps stale rows; merges are whole.

Also: every subcommand stops on SIGINT/SIGTERM with exit 130, quietly with
``-q``, and its documented resume finishes the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import VISBATCH, assert_one_line_error, invoke_cli, write_image

pytestmark = pytest.mark.slow  # subprocesses, the wheel, real weights or held-out runs


TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for i in range(5):
        write_image(root / f"img_{i}.jpg", size=(40 + i, 36), seed=i)
    return root


def rows(path: Path) -> dict:
    return {r["path"]: r for r in pq.read_table(path).to_pylist()}


@pytest.mark.parametrize(
    "command,first,second,option",
    [
        (["saliency", *TINY_CNN], ["--method", "gradient"], ["--method", "gradcam"], "method"),
        (["saliency", *TINY_CNN, "--method", "smoothgrad"], ["--samples", "2"], ["--samples", "3"], "samples"),
        (
            ["saliency", *TINY_CNN, "--method", "smoothgrad", "--samples", "2"],
            ["--sigma", "0.1"],
            ["--sigma", "0.2"],
            "sigma",
        ),
        (["saliency", *TINY_CNN, "--method", "gradient"], ["--target", "1"], ["--target", "2"], "target"),
        (["classify", *TINY_CNN], ["--top-k", "2"], ["--top-k", "3"], "top_k"),
        (["classify", *TINY_CNN], ["--max-pixels", "0"], [], "max_pixels"),
        (
            ["clip-score", "--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"],
            ["--labels", "a,b"],
            ["--labels", "a,c"],
            "labels",
        ),
    ],
)
def test_a_resume_with_other_options_is_refused_naming_the_option(folder, tmp_path, command, first, second, option):
    out = tmp_path / "o.parquet"
    assert invoke_cli(*command, folder, "-o", out, "--limit", "2", *first).exit_code == 0
    before = out.read_bytes()
    result = invoke_cli(*command, folder, "-o", out, "--resume", *second)
    assert_one_line_error(result, 2, option)
    assert out.read_bytes() == before
    # The same options resume fine, and the rows were made by one configuration.
    assert invoke_cli(*command, folder, "-o", out, "--resume", *first).exit_code == 0
    assert len(rows(out)) == 5


@pytest.mark.slow
def test_an_interrupted_run_also_refuses_other_options(tmp_path):
    root = tmp_path / "many"
    for i in range(300):
        write_image(root / f"{i:03d}.jpg", size=(48, 48), seed=i)
    out = tmp_path / "o.parquet"
    parts = tmp_path / "o.parquet.parts"
    proc = subprocess.Popen(
        [*VISBATCH, "classify", *TINY_CNN, str(root), "-o", str(out), "--top-k", "2", "--batch-size", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _signal_when(proc, lambda: len(list(parts.glob("part-*.arrow"))) >= 3, signal.SIGINT)
    assert proc.returncode == 130 and (parts / "run.json").exists()
    result = invoke_cli("classify", *TINY_CNN, root, "-o", out, "--resume", "--top-k", "4")
    assert_one_line_error(result, 2, "top_k: 2 -> 4")
    fresh = invoke_cli("classify", *TINY_CNN, root, "-o", out, "--top-k", "2")
    assert_one_line_error(fresh, 2, "--resume")
    done = invoke_cli("classify", *TINY_CNN, root, "-o", out, "--resume", "--top-k", "2", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout.strip().splitlines()[-1])["resumed"] >= 3
    assert len(rows(out)) == 300 and not parts.exists()


def test_resume_redoes_changed_files_and_drops_deleted_ones(folder, tmp_path):
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, folder, "-o", out).exit_code == 0
    old = rows(out)
    # Same size, same modification time, other bytes: only the content hash can tell.
    target = folder / "img_1.jpg"
    data = bytearray(target.read_bytes())
    st = target.stat()
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    write_image(folder / "img_2.jpg", size=(64, 64), seed=42)  # other size and time
    (folder / "img_3.jpg").unlink()
    write_image(folder / "new.jpg", seed=7)
    result = invoke_cli("classify", *TINY_CNN, folder, "-o", out, "--resume", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["resumed"], summary["changed"], summary["removed"], summary["processed"]) == (2, 2, 1, 3)
    assert (summary["ok"], summary["failed"], summary["inputs"]) == (5, 0, 5)
    new = rows(out)
    assert sorted(new) == ["img_0.jpg", "img_1.jpg", "img_2.jpg", "img_4.jpg", "new.jpg"]
    assert new["img_1.jpg"]["content_hash"] != old["img_1.jpg"]["content_hash"]
    assert new["img_2.jpg"]["width"] == 64 and new["img_0.jpg"] == old["img_0.jpg"]


def test_the_embedding_cache_checks_content_not_just_size_and_time(folder, tmp_path):
    out = tmp_path / "o.parquet"
    assert invoke_cli("select-data", *TINY_CNN, folder, "-o", out, "--json").exit_code == 0
    target = folder / "img_4.jpg"
    data = bytearray(target.read_bytes())
    st = target.stat()
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = invoke_cli("select-data", *TINY_CNN, folder, "-o", out, "--overwrite", "--json")
    assert json.loads(result.stdout.strip().splitlines()[-1])["embedded"] == 1


def test_merge_refuses_missing_shards_and_unrelated_runs(folder, tmp_path):
    for i in range(5, 12):
        write_image(folder / f"img_{i}.jpg", seed=i)
    parts = []
    for i in range(3):
        part = tmp_path / f"p{i}.parquet"
        assert invoke_cli("classify", *TINY_CNN, folder, "--shard", f"{i}/3", "-o", part).exit_code == 0
        parts.append(part)
    whole = tmp_path / "whole.parquet"
    assert invoke_cli("classify", *TINY_CNN, folder, "-o", whole).exit_code == 0
    result = invoke_cli("merge", parts[0], parts[2], "-o", tmp_path / "m.parquet")
    assert_one_line_error(result, 2, "1/3 missing")
    partial = invoke_cli("merge", parts[0], parts[2], "-o", tmp_path / "m.parquet", "--allow-partial")
    assert partial.exit_code == 0 and "merged 2 of 3 shards" in partial.stderr
    result = invoke_cli("merge", parts[0], whole, "-o", tmp_path / "x.parquet")
    assert_one_line_error(result, 2, "not a --shard output")
    other = tmp_path / "other.parquet"
    assert invoke_cli("classify", *TINY_CNN, folder, "--shard", "1/3", "--top-k", "2", "-o", other).exit_code == 0
    result = invoke_cli("merge", parts[0], other, parts[2], "-o", tmp_path / "y.parquet")
    assert_one_line_error(result, 2, "top_k")


def _signal_when(proc: subprocess.Popen, ready, sig=signal.SIGTERM, timeout: float = 120) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready():
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_detect_aigi_train_stops_with_130_and_resumes(tmp_path, sig):
    root = tmp_path / "root"
    for label in ("0_real", "1_fake"):
        for i in range(150):
            write_image(root / label / f"{i:03d}.png", size=(96, 96), seed=i + (1000 if label == "1_fake" else 0))
    detector = tmp_path / "d.safetensors"
    args = [
        *VISBATCH,
        "detect-aigi",
        "train",
        str(root),
        "--features",
        "npr,bitplane,spectrum",
        "--size",
        "64",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "-o",
        str(detector),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "d.features.parquet.parts"
    _, stderr = _signal_when(proc, lambda: len(list(parts.glob("part-*.arrow"))) >= 2, sig)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr and not detector.exists()
    done = subprocess.run([*args, "--resume", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert detector.exists() and json.loads(done.stdout)["train"] + json.loads(done.stdout)["held_out"] == 300


@pytest.mark.slow
def test_quantize_stops_with_130_silently_with_q(tmp_path, fixture_images):
    calib = tmp_path / "calib"
    calib.mkdir()
    from PIL import Image

    photo = Image.open(fixture_images / "chelsea.jpg")
    for i in range(96):  # minutes of calibration: the signal lands while it runs, however fast the machine
        photo.rotate(i * 3.75).save(calib / f"{i}.jpg")
    out = tmp_path / "q.safetensors"
    proc = subprocess.Popen(
        [
            *VISBATCH,
            "quantize",
            "--model",
            "efficientnet-lite0",
            "--calib",
            str(calib),
            "--method",
            "gptq",
            "--device",
            "cpu",
            "-o",
            str(out),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The event: the job holds its output's lock, taken once every check has passed and just
    # before calibration starts (with -q nothing is printed to wait for).
    lock = tmp_path / "q.safetensors.lock"
    stdout, stderr = _signal_when(proc, lock.exists, signal.SIGTERM)
    assert proc.returncode == 130 and stderr == "" and stdout == ""
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".q*"))
