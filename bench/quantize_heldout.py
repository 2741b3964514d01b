"""quantize on images it never saw: each method's held-out error for calibration sets of 4, 16 and 64 images.

Calibration images come from fixtures/photos/calib (the photos, then random
crops and flips of them for the larger sets); every figure is measured on
fixtures/photos/heldout, 10 other photos that calibrate nothing. Model:
efficientnet-lite0 (real weights). Run by hand:

    .venv/bin/python bench/quantize_heldout.py --bits 8 4 --sizes 4 16 64

Prints one JSON row per (size, bits, method) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
from photo_sets import HELDOUT, calibration_folder  # noqa: E402


def run(model, size: int, bits: int, method: str, tmp: Path, group_size: int = 128) -> dict:
    from visbatch.core.pipeline import RunConfig
    from visbatch.core.sources import find_images
    from visbatch.core.tasks.quantize.job import QuantizeOptions, run_quantize

    calib = find_images([str(calibration_folder(tmp / f"calib{size}", size))])
    held_out = find_images([str(HELDOUT)])
    options = QuantizeOptions(bits=bits, group_size=group_size, method=method)
    config = RunConfig(output="unused", batch_size=16, workers=0, quiet=True)
    report = run_quantize(model, calib, held_out, str(tmp / f"q{size}-{bits}-{method}.safetensors"), options, config)
    return {
        k: report.get(k)
        for k in (
            "method",
            "bits",
            "calibration_images",
            "validation_images",
            "eval_images",
            "cosine_min",
            "cosine_mean",
            "top1_agreement",
            "output_mse",
            "rtn_output_mse",
            "worse_than_rtn",
            "layers_by_method",
        )
    } | {"size": size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--methods", nargs="+", default=["rtn", "awq", "gptq", "auto"])
    args = parser.parse_args()
    from visbatch.core.models import load_model

    model = load_model("efficientnet-lite0", device="cpu", precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for bits in args.bits:
                for method in args.methods:
                    print(json.dumps(run(model, size, bits, method, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
