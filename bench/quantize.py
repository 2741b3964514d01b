"""quantize: size, output error and images/s of RTN, AWQ and GPTQ, int8 and int4, side by side.

torchao's int8 and int4 weight-only run on the same model when torchao is
installed (it quantizes ``nn.Linear`` layers only: here, the classifier).

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


def torchao_rows(model, photos, config) -> list[dict]:
    """torchao's int8 and int4 weight-only on the same model (it quantizes nn.Linear layers only)."""
    import copy
    import io

    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return []
    from visbatch.core.pipeline import make_loader
    from visbatch.core.tasks.quantize import run_images

    batch = next(iter(make_loader(photos, model, config))).images
    with torch.inference_mode():
        reference = run_images(model, batch).float()
    rows = []
    for bits, make in ((8, lambda: Int8WeightOnlyConfig()), (4, lambda: Int4WeightOnlyConfig(group_size=128))):
        module = copy.deepcopy(model.module)
        row = {"method": "torchao", "bits": bits}
        try:
            quantize_(module, make())
            original, model.module = model.module, module
            try:
                with torch.inference_mode():
                    out = run_images(model, batch).float()
                    start = time.perf_counter()
                    for _ in range(3):
                        run_images(model, batch)
                    speed = 3 * batch.shape[0] / (time.perf_counter() - start)
            finally:
                model.module = original
            buffer = io.BytesIO()
            torch.save(module.state_dict(), buffer)
            cosine = F.cosine_similarity(reference, out)
            row.update(
                cosine_mean=float(cosine.mean()),
                cosine_min=float(cosine.min()),
                top1_agreement=float((reference.argmax(1) == out.argmax(1)).float().mean()),
                output_mse=float(((reference - out) ** 2).mean()),
                bytes_after=buffer.tell(),
                images_per_s_after=speed,
            )
        except Exception as exc:  # torchao's int4 needs CUDA or a special CPU layout
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--eval-generated",
        type=int,
        default=0,
        help="Also evaluate on this many generated JPEGs (not in the calibration set).",
    )
    args = parser.parse_args()

    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig
    from visbatch.core.sources import find_images
    from visbatch.core.tasks.quantize.job import QuantizeOptions, run_quantize

    tmp = Path(tempfile.mkdtemp())
    make_folder(tmp / "calib", args.images, seed=1)
    calib = find_images([str(tmp / "calib")])
    photos = find_images([str(REPO / "fixtures" / "images")])
    if args.eval_generated:  # four photos are a noisy yardstick: add held-out generated images
        make_folder(tmp / "eval", args.eval_generated, seed=9)
        photos += find_images([str(tmp / "eval")])
    model = load_model("efficientnet-lite0", device=args.device, precision="fp32")
    config = RunConfig(output="unused", batch_size=args.batch_size, workers=0, quiet=True)
    rows = []
    for bits in (8, 4):
        for method in ("rtn", "awq", "gptq"):
            out = tmp / f"{method}{bits}.safetensors"
            start = time.perf_counter()
            report = run_quantize(
                model, calib, photos, str(out), QuantizeOptions(bits=bits, group_size=128, method=method), config
            )
            rows.append(
                {
                    "method": method,
                    "bits": bits,
                    "seconds_to_quantize": time.perf_counter() - start,
                    **{k: v for k, v in report.items() if k not in ("layers", "kept")},
                }
            )
    rows += torchao_rows(model, photos, config)
    if args.json:
        print(json.dumps(rows))
        return
    print(
        "| method | bits | file MB (fp32 MB) | logit cosine mean / min | top-1 agreement | output MSE | "
        "img/s before / after | quantize s |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['bits']} | not available: {r['error']} |")
            continue
        if r["method"] == "torchao":
            print(
                f"| torchao | {r['bits']} | {r['bytes_after'] / 1e6:.1f} | {r['cosine_mean']:.5f} / "
                f"{r['cosine_min']:.5f} | {r['top1_agreement']:.2f} | {r['output_mse']:.4f} | "
                f"- / {r['images_per_s_after']:.1f} | - |"
            )
            continue
        print(
            f"| {r['method']} | {r['bits']} | {r['bytes_after'] / 1e6:.1f} ({r['bytes_before'] / 1e6:.1f}) | "
            f"{r['cosine_mean']:.5f} / {r['cosine_min']:.5f} | {r['top1_agreement']:.2f} | {r['output_mse']:.4f} | "
            f"{r['images_per_s_before']:.1f} / {r['images_per_s_after']:.1f} | {r['seconds_to_quantize']:.1f} |"
        )


if __name__ == "__main__":
    main()
