"""What a new user found beyond the data loss (issue 23, items 6-22): hangs and aborts on damaged
shards, wrong or silent results, late or missing refusals, URL outputs of merge and report,
multi-line errors. Each case failed on the code before the run plan."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE_IMAGES, VISBATCH, assert_one_line_error, invoke_cli, snapshot, write_image

TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    from PIL import Image

    Image.effect_noise((32, 24), 40 + seed).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def _block(header: tarfile.TarInfo) -> bytes:
    return header.tobuf(format=tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _shard_with_pax(path: Path, records: bytes) -> Path:
    """A tar whose second member is preceded by a pax header holding ``records`` as written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = _jpeg(1)
        info = tarfile.TarInfo("good.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    body = out.getvalue().rstrip(b"\0")
    body = _padded(body)
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = len(records)
    data = _jpeg(2)
    member = tarfile.TarInfo("second.jpg")
    member.size = len(data)
    path.write_bytes(body + _block(pax) + _padded(records) + _block(member) + _padded(data) + b"\0" * 1024)
    return path


# -- 6, 7: a damaged pax header is one error row, never a hang or an abort ---------------------


@pytest.mark.parametrize(
    "records",
    [b"0 x=y\n", b"12 size=abc\n", b"13 mtime=abc\n", b"9 mtimeabc", b"99 path=x\n", b"-5 a=b\n"],
    ids=["zero-length", "size-not-a-number", "mtime-not-a-number", "no-space", "past-the-end", "negative"],
)
def test_a_damaged_pax_header_is_one_error_row_beside_the_good_shard(tmp_path, records):
    bad = _shard_with_pax(tmp_path / "shards" / "bad.tar", records)
    good = tmp_path / "shards" / "good.tar"
    with tarfile.open(good, "w") as tar:
        data = _jpeg(3)
        info = tarfile.TarInfo("fine.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "o.parquet"
    result = subprocess.run(
        [*VISBATCH, "classify", str(bad.parent), *TINY_CNN, "-o", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["good.tar/fine"]["status"] == "ok" and rows["bad.tar/good"]["status"] == "ok"
    broken = [r for r in rows.values() if r["status"] == "error"]
    assert len(broken) == 1 and "truncated or corrupt tar" in broken[0]["error"], rows


# -- 8: Ray paths are absolute (in test_engine_ray.py, with the cluster) ----------------------

# -- 9, 13: planned writes that collide ---------------------------------------------------------


def test_a_report_path_equal_to_the_output_is_refused(tmp_path):
    photos = FIXTURE_IMAGES
    result = invoke_cli("classify", *TINY_CNN, photos, "-o", tmp_path / "x.html", "--report")
    assert_one_line_error(result, 2, "one would replace the other")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--overlays", "--save-maps"])
def test_pictures_inside_the_parts_folder_are_refused(tmp_path, option):
    result = invoke_cli(
        "saliency", *TINY_CNN, FIXTURE_IMAGES, "--method", "gradient", "-o", tmp_path / "o.parquet",
        option, tmp_path / "o.parquet.parts" / "pictures",
    )  # fmt: skip
    assert_one_line_error(result, 2, "lies inside the output parts folder")
    assert list(tmp_path.iterdir()) == []


# -- 10: every shard of one job has the same columns -------------------------------------------


def test_merge_takes_shards_of_two_roots_where_one_shard_holds_one_root(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_image(a / "x.jpg", seed=1)
    for n in range(6):
        write_image(b / f"y{n}.jpg", seed=10 + n)
    from visbatch.core.sources import shard_of

    # A shard count where some shard holds images of one root only.
    count = next(c for c in range(2, 9) if any({shard_of("x.jpg", c)} != {shard_of(f"y{n}.jpg", c)} for n in range(6)))
    parts = []
    for i in range(count):
        part = tmp_path / f"p{i}.parquet"
        result = invoke_cli("classify", *TINY_CNN, a, b, "--shard", f"{i}/{count}", "-o", part)
        assert result.exit_code in (0, 2), result.stderr  # a shard may hold nothing
        if result.exit_code == 0:
            parts.append(part)
    columns = {tuple(pq.read_schema(p).names) for p in parts}
    assert len(columns) == 1 and "root" in next(iter(columns)), columns
    merged = tmp_path / "all.parquet"
    result = invoke_cli("merge", *parts, "-o", merged, "--allow-partial")
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(merged).num_rows == 7


# -- 11, 16, 21: select-data refuses first, stops with 130, creates its output's folder ---------


@pytest.mark.slow
def test_select_data_stopped_while_embedding_exits_130_and_keeps_its_embeddings(tmp_path):
    pool = tmp_path / "pool"
    for n in range(160):
        write_image(pool / f"{n:03d}.jpg", seed=n, size=(40, 40))
    out = tmp_path / "sel.parquet"
    args = [*VISBATCH, "select-data", str(pool), *TINY_CLIP, "--batch-size", "2", "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "sel.embeddings.parquet.pending.parquet.parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*.arrow"))) < 3:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)  # polling for the event (parts on disk), not a timing guess
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command again" in stderr
    assert not out.exists() and len(list(parts.glob("part-*.arrow"))) >= 3
    again = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == 160 and summary["ok"] == 160
    assert pq.read_table(out).num_rows == 160 and not parts.exists()


@pytest.mark.slow
def test_select_data_refusals_come_before_any_embedding(tmp_path):
    pool = tmp_path / "pool"
    for n in range(3):
        write_image(pool / f"{n}.jpg", seed=n)
    copies = tmp_path / "copies"
    write_image(copies / "1.jpg", seed=99)  # exists and differs from the pool's 1.jpg
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "000000.tar").write_bytes(b"")
    for extra, fragment in ((["--copy-to", copies], "destination files exist"), (["--write-shards", shards], ".tar")):
        before = sorted(tmp_path.rglob("*"))
        result = invoke_cli("select-data", pool, *TINY_CLIP, "-o", tmp_path / "s.parquet", *extra)
        assert_one_line_error(result, 2, fragment)
        assert sorted(tmp_path.rglob("*")) == before, "a refused run leaves nothing"


@pytest.mark.slow
def test_select_data_creates_its_output_folder(tmp_path):
    pool = tmp_path / "pool"
    for n in range(3):
        write_image(pool / f"{n}.jpg", seed=n)
    out = tmp_path / "new" / "deeper" / "sel.parquet"
    result = invoke_cli("select-data", pool, *TINY_CLIP, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).num_rows == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["sel.embeddings.parquet", "sel.parquet"]


# -- 12: the shard is a resume key -------------------------------------------------------------


def test_resume_with_another_shard_is_refused(tmp_path, image_folder):
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, image_folder, "--shard", "0/2", "-o", out).exit_code == 0
    result = invoke_cli("classify", *TINY_CNN, image_folder, "--shard", "1/2", "-o", out, "--resume")
    assert_one_line_error(result, 2, "--shard: 0/2 -> 1/2")


def test_resume_adding_a_root_names_it(tmp_path, image_folder):
    other = tmp_path / "other"
    write_image(other / "z.jpg", seed=5)
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, image_folder, "-o", out).exit_code == 0
    result = invoke_cli("classify", *TINY_CNN, image_folder, other, "-o", out, "--resume")
    assert_one_line_error(result, 2, f"input roots: added {other}")


# -- 14: --keep-columns that visbatch writes ----------------------------------------------------


@pytest.mark.parametrize("column", ["file_size", "file_mtime", "content_hash", "path_bytes", "top_labels"])
def test_keep_columns_clashing_with_visbatch_columns_is_a_usage_error(tmp_path, column):
    data = (FIXTURE_IMAGES / "coffee.jpg").read_bytes()
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [data], column: ["x"]}), table)
    result = invoke_cli("classify", *TINY_CNN, table, "--keep-columns", column, "-o", tmp_path / "o.parquet")
    assert_one_line_error(result, 2, f"--keep-columns {column!r}")
    assert not (tmp_path / "o.parquet").exists()


# -- 17: an offline hub is one line, fast ------------------------------------------------------


def test_an_offline_hub_is_one_line_without_retries(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [*VISBATCH, "classify", str(FIXTURE_IMAGES / "coffee.jpg"), "-m", "timm:resnet18", "--device", "cpu",
         "-o", str(tmp_path / "o.parquet")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot download weights for timm:resnet18" in lines[0], result.stderr
    assert "--pretrained PATH" in lines[0] and time.monotonic() - started < 60
    offline = invoke_cli("classify", FIXTURE_IMAGES / "coffee.jpg", "-m", "timm:resnet18", "-o", tmp_path / "p")
    assert_one_line_error(offline, 3, "HF_HUB_OFFLINE is set")


# -- 18: bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["classify", "--engine", "local", "--concurrency", "garbage"], "--concurrency 'garbage'"),
        (["clip-score", "--prompt", "a photo", "--weight", "nan"], "must be a finite number"),
        (["clip-score", "--prompt", "a photo", "--weight", "inf"], "must be a finite number"),
        (["clip-score", "--prompt", "a photo", "--weight", "-1"], "--weight -1.0"),
        (["classify", "--alpha", "nan"], "--alpha"),
        (["select-data", "--min-clip-score", "nan"], "must be a finite number"),
    ],
)
def test_bad_values_are_refused(tmp_path, args, fragment):
    model = TINY_CLIP if args[0] != "classify" else TINY_CNN
    result = invoke_cli(args[0], *model, FIXTURE_IMAGES, *args[1:], "-o", tmp_path / "o.parquet")
    assert_one_line_error(result, 2, fragment)


# -- 19: manifests and captions ------------------------------------------------------------------


def test_manifest_encodings_and_shapes(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name, seed=len(name))
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffpath\na.jpg\nb.jpg\n".encode())
    result = invoke_cli("classify", *TINY_CNN, "--manifest", bom, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 2
    for lines, fragment in (('{"path": "a.jpg"}\n["b.jpg"]\n', ":2: a JSON list"), ('"a.jpg"\n', ":1: a JSON str")):
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(lines)
        result = invoke_cli("classify", *TINY_CNN, "--manifest", manifest, "-o", tmp_path / "p.parquet")
        assert_one_line_error(result, 2, fragment)


def test_a_caption_file_with_a_byte_order_mark_loses_it(tmp_path):
    from visbatch.core.sources import ImageItem
    from visbatch.core.texts import read_sidecar_caption

    write_image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_bytes("\ufeffa cat\n".encode())
    assert read_sidecar_caption(ImageItem(str(tmp_path), "a.jpg")) == {"caption": "a cat"}


# -- 20: silent or wrong results ----------------------------------------------------------------


def test_a_broken_symlink_is_an_error_row(tmp_path):
    root = tmp_path / "in"
    write_image(root / "ok.jpg")
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, root, "-o", out).exit_code == 0
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["ok.jpg"]["status"] == "ok"
    assert rows["broken.jpg"]["status"] == "error" and "broken symbolic link" in rows["broken.jpg"]["error"]


def test_a_png_whose_data_stops_early_is_an_error_row(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes(range(48)) for _ in range(4))  # 4 of 64 rows, a complete zlib stream
    header = struct.pack(">IIBBBBB", 16, 64, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "short.png").write_bytes(png)
    write_image(tmp_path / "in" / "whole.png", fmt="PNG")
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, tmp_path / "in", "-o", out).exit_code == 0
    rows_out = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert rows_out["whole.png"]["status"] == "ok"
    assert rows_out["short.png"]["status"] == "error" and "covers 4 of 64 rows" in rows_out["short.png"]["error"]


def test_a_folder_named_twice_through_a_link_is_read_once(tmp_path, image_folder):
    link = tmp_path / "inlink"
    link.symlink_to(image_folder)
    out = tmp_path / "o.parquet"
    result = invoke_cli("classify", *TINY_CNN, image_folder, link, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).num_rows == 10 and "read once" in result.stderr


def test_a_url_output_ending_in_a_slash_is_refused(tmp_path):
    result = invoke_cli("classify", *TINY_CNN, FIXTURE_IMAGES, "-o", "memory://bkt/newprefix/")
    assert_one_line_error(result, 2, "ends with '/'")
    result = invoke_cli("classify", *TINY_CNN, FIXTURE_IMAGES, "-o", f"{tmp_path}/newdir/")
    assert_one_line_error(result, 2, "is a folder")
    assert list(tmp_path.iterdir()) == []


def test_report_max_images_zero_has_no_galleries_and_odd_metadata_is_refused(tmp_path):
    pytest.importorskip("jinja2")
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, FIXTURE_IMAGES, "-o", out).exit_code == 0
    page = tmp_path / "r.html"
    result = invoke_cli("report", out, "-o", page, "--max-images", "0")
    assert result.exit_code == 0, result.stderr
    assert "0 images" in result.stderr and 'class="card"' not in page.read_text()
    from visbatch.core.outputs import METADATA_KEY

    odd = tmp_path / "odd.parquet"
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps({"task": ["classify"]}).encode()}), odd)
    assert_one_line_error(invoke_cli("report", odd, "-o", tmp_path / "odd.html"), 2, "task is not a name")


# -- 21: an output beside an input file (test_run_plan.py) ----------------------------------------

# -- 22: signal tests synchronise on an event (test_misuse_resume.py, test_misuse_names.py) -----


def test_inputs_stay_as_they_were_through_every_case_above(tmp_path):
    """The fixtures the tests above read are unchanged by them (a cheap guard of the guard)."""
    before = snapshot(FIXTURE_IMAGES)
    invoke_cli("classify", *TINY_CNN, FIXTURE_IMAGES, "-o", FIXTURE_IMAGES / "coffee.jpg", "--overwrite")
    assert snapshot(FIXTURE_IMAGES) == before


def test_a_ray_run_whose_workers_commit_fewer_rows_than_handed_out_fails(tmp_path, monkeypatch):
    """Item 8: the driver checks the rows committed against the items handed out (a worker that
    wrote its parts elsewhere gave "0 ok, 0 failed" and exit 0)."""
    pytest.importorskip("ray")
    import numpy as np

    from visbatch.core.engines import ray_data

    lost = {k: np.array([v]) for k, v in (("ok", 0), ("failed", 0), ("overlays", 0))}
    lost |= {"errors": np.array(["[]"]), "observed": np.array([pickle.dumps([])], dtype=object)}
    lost |= {"counted": np.array(["{}"])}
    monkeypatch.setattr(ray_data, "connect", lambda options: {"cpus": 2, "gpus": 0})
    monkeypatch.setattr(ray_data.RayEngine, "start", lambda self, run: setattr(self, "task", run.task) or {})
    monkeypatch.setattr(ray_data.RayEngine, "_dataset", lambda self, rows: None)
    monkeypatch.setattr(ray_data, "_batches_of", lambda dataset: iter([lost]))  # a batch that committed nothing
    result = invoke_cli("classify", *TINY_CNN, FIXTURE_IMAGES, "--engine", "ray", "-o", tmp_path / "o.parquet")
    assert_one_line_error(result, 3, "committed 0 rows for the 4 images")
    assert not (tmp_path / "o.parquet").exists()


_HANGING_LISTING = """
import sys, time
import visbatch.core.sources.stream as stream

def never_ends(root, name, warnings=None, kept=()):
    print("listing started", file=sys.stderr, flush=True)
    while True:  # a loop that makes no progress, as the pax parser's did
        time.sleep(0.5)

stream.list_shard = never_ends
from visbatch.cli.main import main
sys.argv = ["visbatch", "classify", sys.argv[1], "--model", "test-tiny-cnn", "--device", "cpu", "-o", sys.argv[2]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_listing_that_never_ends(tmp_path, sig):
    """Item 6: whatever loop a run is in, a signal stops it (the listing ran in a thread the
    interpreter waited for at exit: "interrupted" was printed and the process went on)."""
    import sys

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(FIXTURE_IMAGES / "coffee.jpg", arcname="0.jpg")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANGING_LISTING, str(shard), str(tmp_path / "o.parquet")],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr.readline().strip() == "listing started"  # the event: the listing is under way
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr


# -- found by the adversarial review of the run plan -------------------------------------------


def _photo_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        (root / name).write_bytes((FIXTURE_IMAGES / name).read_bytes())
    return root


def test_a_file_url_with_one_slash_is_the_path_it_names(tmp_path):
    photos = _photo_folder(tmp_path / "photos")
    before = snapshot(photos)
    result = invoke_cli("classify", *TINY_CNN, photos, "-o", f"file:{photos}/x.parquet")
    assert_one_line_error(result, 2, "input folder")
    assert snapshot(photos) == before and not Path("file:").exists()
    ok = invoke_cli("classify", *TINY_CNN, photos, "-o", f"file:{tmp_path}/x.parquet")
    assert ok.exit_code == 0, ok.stderr
    assert pq.read_table(tmp_path / "x.parquet").num_rows == 2 and not Path("file:").exists()


def test_a_table_cell_naming_a_file_url_is_read_and_protected(tmp_path):
    images = _photo_folder(tmp_path / "m")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [f"file:{images}/chelsea.jpg", f"file://{images}/coffee.jpg"]}), table)
    before = snapshot(images)
    refused = invoke_cli("classify", *TINY_CNN, table, "-o", images / "chelsea.jpg", "--overwrite")
    assert_one_line_error(refused, 2, "is the input file")
    assert snapshot(images) == before
    out = tmp_path / "o.parquet"
    assert invoke_cli("classify", *TINY_CNN, table, "-o", out).exit_code == 0
    assert [r["status"] for r in pq.read_table(out).to_pylist()] == ["ok", "ok"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["copy", "hardlink"])
def test_a_link_inside_the_copy_folder_is_refused_before_anything(tmp_path, mode):
    photos = _photo_folder(tmp_path / "photos")
    write_image(photos / "space" / "rocket.jpg", seed=3)
    dst, elsewhere = tmp_path / "dst", tmp_path / "elsewhere"
    dst.mkdir()
    elsewhere.mkdir()
    (dst / "space").symlink_to(photos / "space" if mode == "hardlink" else elsewhere)
    before, listing = snapshot(photos), sorted(tmp_path.rglob("*"))
    option = ["--copy-to", dst] if mode == "copy" else ["--link-to", dst, "--link", "hardlink"]
    result = invoke_cli("select-data", photos, *TINY_CLIP, "--budget", "3", *option, "-o", tmp_path / "s.parquet")
    assert_one_line_error(result, 2, "a link in the folder")
    assert snapshot(photos) == before and sorted(tmp_path.rglob("*")) == listing


@pytest.mark.slow
def test_a_clip_score_table_given_as_cache_is_never_rewritten(tmp_path):
    photos = _photo_folder(tmp_path / "photos")
    table = tmp_path / "X.embeddings.parquet"
    made = invoke_cli("clip-score", photos, *TINY_CLIP, "--prompt", "a photo", "--save-embeddings", "-o", table)
    assert made.exit_code == 0, made.stderr
    before = snapshot(table)
    result = invoke_cli("select-data", photos, *TINY_CLIP, "--cache", table, "-o", tmp_path / "X.parquet")
    assert_one_line_error(result, 2, "is the input file")
    assert snapshot(table) == before
    ok = invoke_cli("select-data", photos, *TINY_CLIP, "--cache", table, "-o", tmp_path / "Y.parquet")
    assert ok.exit_code == 0, ok.stderr
    assert snapshot(table) == before and (tmp_path / "Y.embeddings.parquet").exists()


@pytest.mark.slow
def test_side_files_of_jobs_are_replaced_only_when_they_are_visbatch_s_own(tmp_path):
    calib = _photo_folder(tmp_path / "calib")
    (tmp_path / "q.report.parquet").write_text("mine")
    args = ["quantize", "--calib", calib, *TINY_CNN[:4], "--method", "rtn", "-o", tmp_path / "q.safetensors"]
    assert_one_line_error(invoke_cli(*args), 2, "q.report.parquet exists")
    assert (tmp_path / "q.report.parquet").read_text() == "mine"
    (tmp_path / "q.report.parquet").unlink()
    assert invoke_cli(*args).exit_code == 0
    assert invoke_cli(*args, "--overwrite").exit_code == 0  # its own report goes with the file
    root = tmp_path / "root"
    for label, seed in (("0_real", 0), ("1_fake", 20)):
        for n in range(3):
            write_image(root / label / f"{n}.png", seed=seed + n, size=(64, 64), fmt="PNG")
    (tmp_path / "det.features.parquet").write_text("mine")
    train = ["detect-aigi", "train", root, "--features", "npr", "--device", "cpu", "--holdout", "0.34"]
    assert_one_line_error(invoke_cli(*train, "-o", tmp_path / "det.safetensors"), 2, "not a visbatch features table")
    assert (tmp_path / "det.features.parquet").read_text() == "mine"


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_parts_folder_with_files_a_writer_did_not_make_is_refused(tmp_path, flag):
    photos = _photo_folder(tmp_path / "photos")
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    os.link(photos / "chelsea.jpg", parts / "part-000-0.arrow")  # a writer's name, not a writer's file
    (parts / "run.json").write_text("not json")
    before = snapshot(photos, parts)
    result = invoke_cli("classify", *TINY_CNN, photos, "-o", tmp_path / "out.parquet", flag)
    assert_one_line_error(result, 2, "did not write")
    assert snapshot(photos, parts) == before


def test_report_never_writes_over_the_images_it_reads(tmp_path):
    pytest.importorskip("jinja2")
    photos = _photo_folder(tmp_path / "photos")
    out = tmp_path / "out.parquet"
    assert invoke_cli("classify", *TINY_CNN, photos, "-o", out).exit_code == 0
    os.link(photos / "chelsea.jpg", tmp_path / "x.html")
    (tmp_path / "y.html").symlink_to(photos / "coffee.jpg")
    before = snapshot(photos)
    for page in ("x.html", "y.html"):
        result = invoke_cli("report", out, "-o", tmp_path / page, "--overwrite")
        assert_one_line_error(result, 2, "input")
    assert_one_line_error(invoke_cli("report", out, "-o", photos / "r.html"), 2, "input folder")
    assert snapshot(photos) == before


@pytest.mark.parametrize(
    "args,stdin,fragment",
    [
        (["-b", "100000000000000000000"], None, "--batch-size"),
        (["--workers", "99999"], None, "--workers"),
        (["-"], "{photo}\0{photo}\n", "NUL byte"),
    ],
)
def test_absurd_numbers_and_nul_bytes_are_usage_errors(tmp_path, args, stdin, fragment):
    photo = str(FIXTURE_IMAGES / "coffee.jpg")
    inputs = [] if args[0] == "-" else [photo]
    result = invoke_cli(
        "classify", *TINY_CNN[:4], *inputs, *args, "-o", tmp_path / "o.parquet",
        input=stdin.format(photo=photo) if stdin else None,
    )  # fmt: skip
    assert_one_line_error(result, 2, fragment)
    assert not list(tmp_path.iterdir())


def test_merge_refuses_shards_of_different_inputs(tmp_path):
    a, b = tmp_path / "photos", tmp_path / "photos2"
    for n in range(8):  # enough names that each of 2 shards holds some
        write_image(a / f"{n}.jpg", seed=n)
    shutil.copytree(a, b)
    parts = [tmp_path / "p0.parquet", tmp_path / "p1.parquet"]
    assert invoke_cli("classify", *TINY_CNN, a, "--shard", "0/2", "-o", parts[0]).exit_code == 0
    assert invoke_cli("classify", *TINY_CNN, b, "--shard", "1/2", "-o", parts[1]).exit_code == 0
    assert_one_line_error(invoke_cli("merge", *parts, "-o", tmp_path / "m.parquet"), 2, "other inputs")
    assert not (tmp_path / "m.parquet").exists()


def test_a_manifest_with_a_repeated_column_is_refused(tmp_path):
    manifest = tmp_path / "dup.csv"
    manifest.write_text(f"path,path\n{FIXTURE_IMAGES / 'coffee.jpg'},x\n")
    result = invoke_cli("classify", *TINY_CNN, "--manifest", manifest, "-o", tmp_path / "o.parquet")
    assert_one_line_error(result, 2, "'path' appears 2 times")


def test_saliency_resume_with_another_batch_size_goes_on(tmp_path):
    photos = _photo_folder(tmp_path / "photos")
    out = tmp_path / "s.parquet"
    args = ["saliency", *TINY_CNN, photos, "--method", "smoothgrad", "-o", out]
    assert invoke_cli(*args, "-b", "2", "--limit", "1").exit_code == 0
    resumed = invoke_cli(*args, "-b", "8", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert pq.read_table(out).num_rows == 2


@pytest.mark.slow
def test_heatmaps_are_named_as_the_user_typed(tmp_path):
    root = tmp_path / "root"
    for label, seed in (("0_real", 0), ("1_fake", 20)):
        for n in range(3):
            write_image(root / label / f"{n}.png", seed=seed + n, size=(64, 64), fmt="PNG")
    detector = tmp_path / "HM" / "det.safetensors"
    trained = invoke_cli(
        "detect-aigi", "train", root, "--features", "npr", "--device", "cpu", "--holdout", "0.34", "-o", detector
    )
    assert trained.exit_code == 0, trained.stderr
    result = invoke_cli(
        "detect-aigi", "score", root, "--detector", detector, "--heatmaps", detector.parent,
        "--device", "cpu", "-o", tmp_path / "s.parquet",
    )  # fmt: skip
    assert_one_line_error(result, 2, "--heatmaps folder")
