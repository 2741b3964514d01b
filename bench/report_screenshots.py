"""The report screenshots of the README: one per kind, from real runs on the committed photos.

Run by hand (not part of the tests; needs Chromium):

    .venv/bin/python bench/report_screenshots.py

classify, saliency, select-data and quantize run efficientnet-lite0 (real ImageNet weights)
on fixtures/photos/heldout; detect-aigi trains on fixtures/aigi and scores it; clip-score
runs the tiny seeded CLIP (no real CLIP weights can be downloaded here), so its numbers are
meaningless and only the layout is shown. Each page is rendered by headless Chromium into
docs/report-<kind>.png.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "fixtures" / "photos" / "heldout"
AIGI = REPO / "fixtures" / "aigi"
LITE0 = ["--model", "efficientnet-lite0", "--device", "cpu", "-q"]


def visbatch(*args) -> None:
    subprocess.run([sys.executable, "-m", "visbatch.cli", *map(str, args)], check=True)


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Chromium (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = tmp / "pool"
        shutil.copytree(PHOTOS, pool)
        shutil.copy(pool / "camera.jpg", pool / "camera-copy.jpg")  # a duplicate for select-data
        for photo in pool.glob("*.jpg"):
            photo.with_suffix(".txt").write_text(f"a photo of a {photo.stem}")
        runs = {
            "classify": ["classify", pool, *LITE0],
            "saliency": [
                "saliency",
                pool,
                *LITE0,
                "--method",
                "integrated-gradients",
                "--overlays",
                tmp / "ov",
                "--eval-deletion",
                "blur",
            ],  # fmt: skip
            "select-data": ["select-data", pool, *LITE0],
            "clip-score": ["clip-score", pool, "--model", "test-tiny-clip", "--device", "cpu", "--sidecar", "-q"],
        }
        for kind, args in runs.items():
            visbatch(*args, "-o", tmp / f"{kind}.parquet")
        visbatch("detect-aigi", "train", AIGI, "--features", "npr,bitplane,spectrum", "--device", "cpu",
                 "-o", tmp / "det.safetensors", "-q")  # fmt: skip
        visbatch("detect-aigi", "eval", AIGI, "--detector", tmp / "det.safetensors", "--device", "cpu",
                 "-o", tmp / "detect-aigi-eval.parquet", "-q")  # fmt: skip
        visbatch("detect-aigi", "score", AIGI / "1_fake", "--detector", tmp / "det.safetensors", "--device", "cpu",
                 "-o", tmp / "detect-aigi.parquet", "-q")  # fmt: skip
        visbatch("quantize", "--calib", pool, *LITE0, "--method", "rtn", "-o", tmp / "q.safetensors")
        shutil.copy(tmp / "q.report.parquet", tmp / "quantize.parquet")
        for kind in (
            "classify",
            "saliency",
            "select-data",
            "clip-score",
            "detect-aigi",
            "detect-aigi-eval",
            "quantize",
        ):
            page = tmp / f"{kind}.html"
            visbatch("report", tmp / f"{kind}.parquet", "-o", page, "-q")
            shot = REPO / "docs" / f"report-{kind}.png"
            subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--virtual-time-budget=5000", "--window-size=1100,1300", f"--screenshot={shot}",
                            page.as_uri()], check=True, capture_output=True)  # fmt: skip
            print(shot.relative_to(REPO))


if __name__ == "__main__":
    main()
