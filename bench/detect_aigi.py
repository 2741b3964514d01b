"""detect-aigi score throughput (images/s), with and without TTA.

Run by hand:

    .venv/bin/python bench/detect_aigi.py --images 128 --batch-size 16

Trains a detector (all four feature groups, efficientnet-lite0 backbone) on
fixtures/aigi, then scores ``--images`` JPEGs (400-800 px) end to end from
the files: decode, 256 px native crop, features, calibrated probability,
Parquet rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import REPO, make_folder, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from visbatch.core.images import decode_image, find_images, pil_to_uint8_chw
    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.tasks.aigi.detector import (
        FeatureExtractor, ScoreTask, read_labelled_root, train_detector,
    )

    model = load_model("efficientnet-lite0", device=args.device)
    groups = ("embedding", "npr", "bitplane", "spectrum")
    extractor = FeatureExtractor(model, groups)
    data = read_labelled_root(str(REPO / "fixtures" / "aigi"))
    features = extractor(torch.stack([pil_to_uint8_chw(decode_image(i.path)) for i in data.items]).to(model.device))
    detector, _ = train_detector(features.cpu(), data, groups, extractor.names(), "crop", 256,
                                 model.describe())
    tmp = Path(tempfile.mkdtemp())
    make_folder(tmp / "images", args.images)
    items = find_images([str(tmp / "images")])
    results = {"images": len(items), "device": str(model.device), "batch_size": args.batch_size}
    for tta in (False, True):
        config = RunConfig(output=str(tmp / "scores.parquet"), batch_size=args.batch_size, workers=args.workers,
                           quiet=True, overwrite=True)
        run = lambda: run_pipeline(ScoreTask(detector, extractor, tta=tta), model, items, config)  # noqa: E731
        run()
        results[f"score_img_s{'_tta' if tta else ''}"] = timed(run, len(items))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
