"""visbatch report: one self-contained page per kind of output, checked as HTML and in a real browser.

The browser checks run Debian's headless Chromium (`.ci/run` installs it); they skip where it
is missing, and CI fails if it is missing there (VISBATCH_REQUIRE_BROWSER=1).
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import FIXTURE_IMAGES, assert_one_line_error, invoke_cli, snapshot, write_image

pytestmark = pytest.mark.slow
TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]
AIGI = FIXTURE_IMAGES.parent / "aigi"


def _ok(result):
    assert result.exit_code == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One output of each kind, made by the CLI on small pools (with a bad file each)."""
    tmp = tmp_path_factory.mktemp("report")
    pool = tmp / "pool"
    for n in range(6):
        write_image(pool / f"{n}.jpg", size=(48 + 4 * n, 40), seed=n)
        (pool / f"{n}.txt").write_text(f"a picture number {n}")
    shutil.copy(pool / "0.jpg", pool / "0-copy.jpg")  # an exact duplicate for select-data
    (pool / "broken.jpg").write_bytes(b"not an image")
    out = {}
    out["classify"] = tmp / "classify.parquet"
    _ok(invoke_cli("classify", pool, *TINY_CNN, "-o", out["classify"]))
    out["clip-score"] = tmp / "clip.parquet"
    _ok(invoke_cli("clip-score", pool, *TINY_CLIP, "--sidecar", "-o", out["clip-score"]))
    out["saliency"] = tmp / "saliency.parquet"
    _ok(
        invoke_cli(  # fmt: skip
            "saliency",
            pool,
            *TINY_CNN,
            "--method",
            "gradient",
            "--eval",
            "--overlays",
            tmp / "ov",
            "-o",
            out["saliency"],
        )
    )
    out["saliency-ig"] = tmp / "saliency-ig.parquet"
    _ok(invoke_cli("saliency", pool, *TINY_CNN, "--method", "input-x-gradient", "--eval", "-o", out["saliency-ig"]))
    out["select-data"] = tmp / "select.parquet"
    _ok(invoke_cli("select-data", pool, *TINY_CNN, "-o", out["select-data"]))
    detector = tmp / "det.safetensors"
    _ok(invoke_cli("detect-aigi", "train", AIGI, "--features", "npr,bitplane", "--size", "96", "-o", detector,
                   "--device", "cpu", "-q"))  # fmt: skip
    out["detect-aigi"] = tmp / "score.parquet"
    _ok(invoke_cli("detect-aigi", "score", pool, "--detector", detector, "--device", "cpu", "-o", out["detect-aigi"]))
    out["detect-aigi-eval"] = tmp / "eval.parquet"
    _ok(
        invoke_cli(
            "detect-aigi", "eval", AIGI, "--detector", detector, "--device", "cpu", "-o", out["detect-aigi-eval"]
        )
    )
    _ok(invoke_cli("quantize", "--model", "test-tiny-cnn", "--calib", pool, "--method", "rtn", "--device", "cpu",
                   "-o", tmp / "q.safetensors", "-q"))  # fmt: skip
    out["quantize"] = tmp / "q.report.parquet"
    return tmp, pool, out


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.galleries, self.kinds, self.svgs = [], {}, [], 0
        self._gallery = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-kind" in attrs:
            self.kinds.append(attrs["data-kind"])
        if tag == "div" and "data-gallery" in attrs:
            self._gallery = attrs["data-gallery"]
            self.galleries[self._gallery] = 0
        if tag == "img":
            self.images.append(attrs.get("src", ""))
            if self._gallery is not None:
                self.galleries[self._gallery] += 1
        if tag == "svg":
            self.svgs += 1


def _report(tmp_path, *results, name="r.html", extra=()) -> tuple[str, _Page]:
    out = tmp_path / name
    result = invoke_cli("report", *results, "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    text = out.read_text()
    page = _Page()
    page.feed(text)
    outside = re.sub(r"data:[^\"')\s]+", "", text)  # base64 may hold '//'
    assert not re.search(r"https?:|//", outside), re.search(r".{40}(https?:|//).{40}", outside)
    assert all(src.startswith("data:image/") for src in page.images)
    return text, page


KINDS = ["classify", "clip-score", "saliency", "select-data", "detect-aigi", "detect-aigi-eval", "quantize"]
# gallery title -> cards, for the pool of 7 images + 1 bad file (per_gallery 12 at the default --max-images)
EXPECTED = {
    "classify": {"lowest confidence": 7},
    "clip-score": {"worst pairs": 6, "best pairs": 6},  # 0-copy.jpg has no caption
    "saliency": {"overlays": 7},
    "select-data": {},  # from the manifest, below
    "detect-aigi": {"most confident fakes": 7, "most confident reals": 7},
    "detect-aigi-eval": {},
    "quantize": {},
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_self_contained_with_its_galleries(outputs, tmp_path, kind):
    _, _, out = outputs
    text, page = _report(tmp_path, out[kind])
    assert page.kinds == [kind]
    assert page.svgs >= 1 or kind == "detect-aigi-eval" and "AP" in text
    expected = dict(EXPECTED[kind])
    import pyarrow.parquet as pq

    if kind == "select-data":
        groups = [g for g in pq.read_table(out[kind]).column("duplicate_group").to_pylist() if g is not None]
        largest = max(groups.count(g) for g in set(groups))
        expected[f"duplicate group ({largest} images)"] = min(largest, 13)  # the kept image + up to 12 copies
        # The explorer's count at the run's own threshold is the manifest's count of near duplicates.
        manifest = pq.read_table(out[kind]).to_pylist()
        near = sum(r["reason"] == "near_duplicate" for r in manifest)
        assert re.search(rf"\(this run\)</td><td>{near}</td>", text), near
        assert "pairs just below the threshold (both kept)" in page.galleries
    if kind == "detect-aigi-eval":
        figures = json.loads(pq.read_schema(out[kind]).metadata[b"visbatch"])["figures"]
        wrong = sum(v for k, v in figures["confusion"].items() if k in ("fake_called_real", "real_called_fake"))
        expected.update({"most confident fakes": 12, "most confident reals": 12, "worst errors": min(12, wrong)})
        assert "ROC per generator" in text and "reliability" in text and "called fake" in text
    for title, count in expected.items():
        assert page.galleries.get(title) == count, (title, page.galleries)
    import pyarrow.parquet as pq

    table = pq.read_table(out[kind])
    if "status" in table.column_names:
        failed = sum(s != "ok" for s in table.column("status").to_pylist())
        assert failed >= 1 and f"{failed} failed" in text and "Error reasons" in text


def test_saliency_methods_side_by_side_and_missing_inputs_are_placeholders(outputs, tmp_path):
    tmp, pool, out = outputs
    text, page = _report(tmp_path, out["saliency"], out["saliency-ig"])
    assert page.kinds == ["saliency", "saliency"] and "Methods side by side" in text
    assert "input-x-gradient" in text and "gradient" in text
    assert "mean deletion curve" in text and "mean insertion curve" in text
    assert text.count("deletion and insertion curves") == 2  # each run's own, per image and mean
    # The stored curves are the ones the AUCs were taken on: their trapezoid mean is the AUC.
    import numpy as np
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(out["saliency"]).to_pylist() if r["status"] == "ok"]
    assert rows and all(len(r["deletion_curve"]) == 17 for r in rows)  # --eval-steps 16: 17 points
    for r in rows:
        for name in ("deletion", "insertion"):
            curve = np.asarray(r[f"{name}_curve"])
            assert abs(((curve[1:] + curve[:-1]) / 2).mean() - r[f"{name}_auc"]) < 1e-5
    moved = tmp / "pool-moved"
    pool.rename(moved)
    try:
        text, page = _report(tmp_path, out["classify"], name="gone.html")
        assert page.images and all(src.startswith("data:image/svg+xml") for src in page.images)
    finally:
        moved.rename(pool)


def test_report_misuse_is_one_line(outputs, tmp_path):
    tmp, pool, out = outputs
    plain = tmp_path / "plain.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.jpg"]}), plain)
    before = snapshot(pool)
    (tmp_path / "taken.html").write_text("mine")
    for args, code, fragment in (
        ([plain], 2, "not written by visbatch"),
        ([tmp_path / "nope.parquet"], 2, "no file"),
        ([pool / "0.txt"], 2, "not a Parquet file"),
        ([out["classify"], "-o", tmp_path / "taken.html"], 2, "exists"),
        ([out["classify"], "-o", tmp_path / "r.txt"], 2, ".html"),
    ):
        if "-o" not in args:
            args = [*args, "-o", tmp_path / "refused.html"]
        assert_one_line_error(invoke_cli("report", *args), code, fragment)
    assert not (tmp_path / "refused.html").exists() and snapshot(pool) == before
    assert (tmp_path / "taken.html").read_text() == "mine"
    newer = tmp_path / "newer.parquet"
    table = pq.read_table(out["classify"])
    meta = json.loads(table.schema.metadata[b"visbatch"])
    meta["visbatch_version"] = "99.0.0"
    pq.write_table(table.replace_schema_metadata({b"visbatch": json.dumps(meta).encode()}), newer)
    assert_one_line_error(invoke_cli("report", newer, "-o", tmp_path / "n.html"), 2, "newer")


def test_report_flag_on_a_subcommand(outputs, tmp_path):
    _, pool, _ = outputs
    out = tmp_path / "c.parquet"
    result = invoke_cli("classify", pool, *TINY_CNN, "-o", out, "--report")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "c.html").exists() and "report:" in result.stderr
    again = invoke_cli("classify", pool, *TINY_CNN, "-o", tmp_path / "d.parquet", "--report")
    assert again.exit_code == 0
    (tmp_path / "e.html").write_text("mine")
    refused = invoke_cli("classify", pool, *TINY_CNN, "-o", tmp_path / "e.parquet", "--report")
    assert_one_line_error(refused, 2, "exists")
    assert (tmp_path / "e.html").read_text() == "mine" and not (tmp_path / "e.parquet").exists()


def test_report_flag_on_the_jobs_with_a_side_table(outputs, tmp_path):
    """detect-aigi eval writes EVAL.html; quantize writes FILE.report.html from its report table."""
    tmp, pool, _ = outputs
    detector = tmp / "det.safetensors"
    evaluation = tmp_path / "e.parquet"
    args = ["detect-aigi", "eval", AIGI, "--detector", detector, "--device", "cpu", "-q", "--report"]
    assert invoke_cli(*args, "-o", evaluation).exit_code == 0
    text = (tmp_path / "e.html").read_text()
    assert "ROC per generator" in text and "cpu / fp32" in text.replace("<td>", "").replace("</td>", "")
    (tmp_path / "f.html").write_text("mine")
    assert_one_line_error(invoke_cli(*args, "-o", tmp_path / "f.parquet"), 2, "exists")
    assert (tmp_path / "f.html").read_text() == "mine" and not (tmp_path / "f.parquet").exists()
    quantize = ["quantize", "--model", "test-tiny-cnn", "--calib", pool, "--method", "rtn", "--device", "cpu", "-q"]
    assert invoke_cli(*quantize, "-o", tmp_path / "q.safetensors", "--report").exit_code == 0
    assert "Quantization" in (tmp_path / "q.report.html").read_text()
    (tmp_path / "r.report.html").write_text("mine")
    assert_one_line_error(invoke_cli(*quantize, "-o", tmp_path / "r.safetensors", "--report"), 2, "exists")
    assert not (tmp_path / "r.safetensors").exists() and (tmp_path / "r.report.html").read_text() == "mine"


def test_a_large_result_gives_a_small_report_quickly(tmp_path):
    """100,000 rows: histograms over all, galleries sampled. Bound: under 3 MB and 60 s here."""
    from visbatch.core.outputs import write_parquet

    rng = np.random.default_rng(0)
    n = 100_000
    labels = [f"class_{i}" for i in rng.integers(0, 50, n)]
    probs = rng.random(n).astype(np.float32)
    table = pa.table(
        {
            "path": [f"{i:07d}.jpg" for i in range(n)],
            "status": ["ok"] * (n - 100) + ["error"] * 100,
            "error": [None] * (n - 100) + ["not an image (unrecognized file format)"] * 100,
            "top_labels": [[label] for label in labels],
            "top_probs": [[float(p)] for p in probs],
        }
    )
    write_parquet(tmp_path / "big.parquet", table, {"task": "classify", "roots": [str(tmp_path / "gone")]})
    start = time.monotonic()
    _, page = _report(tmp_path, tmp_path / "big.parquet", extra=["--max-images", "60"])
    elapsed = time.monotonic() - start
    size = (tmp_path / "r.html").stat().st_size
    assert size < 3_000_000 and elapsed < 60, (size, elapsed)
    assert len(page.images) <= 60


# ----------------------------------------------------------------------------
# In a real browser
# ----------------------------------------------------------------------------


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None and os.environ.get("VISBATCH_REQUIRE_BROWSER"):
        pytest.fail("headless Chromium is required here (VISBATCH_REQUIRE_BROWSER) but not installed")
    return found


def _browser(binary: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", f"--user-data-dir={page.parent / 'chromium-profile'}",
               *args, page.resolve().as_uri()]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_each_report_renders_in_headless_chromium(outputs, tmp_path, kind):
    binary = _chromium()
    if binary is None:
        pytest.skip("no headless Chromium (Debian: apt-get install chromium)")
    _, _, out = outputs
    _report(tmp_path, out[kind])
    page = tmp_path / "r.html"
    shot = tmp_path / "shot.png"
    result = _browser(binary, page, "--window-size=1200,1400", f"--screenshot={shot}")
    assert shot.exists(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [line for line in console if "ERROR" in line or "Uncaught" in line], console
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "the page rendered blank"
    dom = _browser(binary, page, "--dump-dom").stdout
    count = re.search(r'data-images="(\d+)"', dom)
    decoded = re.search(r'data-images-decoded="(\d+)"', dom)
    assert count and decoded, "the page's load handler did not run"
    assert count.group(1) == decoded.group(1), (count.group(1), decoded.group(1))
