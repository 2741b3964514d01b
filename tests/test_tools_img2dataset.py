"""visbatch on what img2dataset writes: its webdataset and parquet outputs, downloaded from an
``http.server`` on 127.0.0.1 serving the fixture photos, with one dead URL."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE_IMAGES, PHOTOS, invoke_cli

pytest.importorskip("img2dataset")
pytestmark = pytest.mark.slow
TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    for n, name in enumerate(PHOTOS):
        shutil.copy(FIXTURE_IMAGES / name, www / f"photo{n}.jpg")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing = www.parent / "urls.txt"
    listing.write_text("\n".join([f"{base}/photo{n}.jpg" for n in range(len(PHOTOS))] + [f"{base}/gone.jpg"]) + "\n")
    try:
        yield listing
    finally:
        server.shutdown()
        server.server_close()


def download(listing: Path, folder: Path, output_format: str) -> Path:
    # img2dataset's sha256 is of the downloaded bytes; with re-encoding off it stores those bytes.
    command = [
        sys.executable, "-m", "img2dataset.main", "--url_list", str(listing), "--output_folder", str(folder),
        "--output_format", output_format, "--processes_count", "1", "--thread_count", "2",
        "--disable_all_reencoding", "True", "--timeout", "5", "--retries", "0",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=folder.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def test_its_webdataset_output_joins_its_own_table_on_key_and_sha256(urls, tmp_path):
    folder = download(urls, tmp_path / "wds", "webdataset")
    out = tmp_path / "o.parquet"
    result = invoke_cli("classify", folder, *TINY_CNN, "--keep-columns", "url,sha256", "--hash", "sha256", "-o", out)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * len(PHOTOS)  # the dead URL has no sample
    theirs = {r["key"]: r for r in pq.read_table(folder / "00000.parquet").to_pylist() if r["status"] == "success"}
    assert sorted(r["key"] for r in rows) == sorted(theirs)
    for row in rows:
        assert row["content_hash"] == theirs[row["key"]]["sha256"] == row["sha256"]
        assert row["url"] == theirs[row["key"]]["url"]
    meta = pq.read_schema(out).metadata[b"visbatch"]
    assert b'"hash": "sha256"' in meta
    again = invoke_cli("classify", folder, *TINY_CNN, "--keep-columns", "url,sha256", "--resume", "-o", out)
    assert again.exit_code == 2 and "hash" in again.output  # a resume never mixes hash algorithms


def test_its_parquet_output_is_a_folder_of_tables(urls, tmp_path):
    folder = download(urls, tmp_path / "pq", "parquet")
    out = tmp_path / "o.parquet"
    result = invoke_cli("classify", folder, *TINY_CNN, "--keep-columns", "url,status", "-o", out)
    assert result.exit_code == 2 and "--keep-columns 'status'" in result.output  # visbatch's own column
    result = invoke_cli("classify", folder, *TINY_CNN, "--keep-columns", "url,key", "-o", out)
    assert result.exit_code == 0, result.output  # the images are its `jpg` column
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["status"] for r in rows) == ["error"] + ["ok"] * len(PHOTOS)
    failed = next(r for r in rows if r["status"] == "error")
    assert failed["url"].endswith("/gone.jpg") and failed["error"] == "empty 'jpg' cell"
