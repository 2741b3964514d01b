"""quantize: size, output error and images/s of RTN, AWQ and GPTQ, int8 and int4, side by side.

Run by hand:

    .venv/bin/python bench/quantize.py --images 32 --batch-size 8

Model: efficientnet-lite0 (real weights); calibration: ``--images`` JPEGs made
from the committed photos; evaluation: the 4 committed photos. Sizes are of
the written files against the fp32 weights; images/s is the model alone on
the evaluation batch, in ``speed`` mode (weights dequantized once and kept).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import REPO, make_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from visbatch.core.images import find_images
    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig
    from visbatch.core.tasks.quantize import run_images
    from visbatch.core.tasks.quantize.job import QuantizeOptions, run_quantize

    tmp = Path(tempfile.mkdtemp())
    make_folder(tmp / "calib", args.images, seed=1)
    calib = find_images([str(tmp / "calib")])
    photos = find_images([str(REPO / "fixtures" / "images")])
    model = load_model("efficientnet-lite0", device=args.device, precision="fp32")
    config = RunConfig(output="unused", batch_size=args.batch_size, workers=0, quiet=True)
    rows = []
    for bits in (8, 4):
        for method in ("rtn", "awq", "gptq"):
            out = tmp / f"{method}{bits}.safetensors"
            start = time.perf_counter()
            report = run_quantize(model, calib, photos, str(out), QuantizeOptions(bits=bits, group_size=128,
                                                                                 method=method), config)
            rows.append({"method": method, "bits": bits, "seconds_to_quantize": time.perf_counter() - start,
                         **{k: v for k, v in report.items() if k not in ("layers", "kept")}})
    if args.json:
        print(json.dumps(rows))
        return
    print("| method | bits | file MB (fp32 MB) | logit cosine mean / min | top-1 agreement | output MSE | "
          "img/s before / after | quantize s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']} | {r['bytes_after'] / 1e6:.1f} ({r['bytes_before'] / 1e6:.1f}) | "
              f"{r['cosine_mean']:.5f} / {r['cosine_min']:.5f} | {r['top1_agreement']:.2f} | {r['output_mse']:.4f} | "
              f"{r['images_per_s_before']:.1f} / {r['images_per_s_after']:.1f} | {r['seconds_to_quantize']:.1f} |")


if __name__ == "__main__":
    main()
