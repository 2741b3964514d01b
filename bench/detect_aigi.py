"""detect-aigi score throughput (images/s): crop policy with and without TTA, and 3x3 tiles.

Run by hand:

    .venv/bin/python bench/detect_aigi.py --images 128 --batch-size 16

Trains a detector (the default groups npr, bitplane, spectrum, layers;
efficientnet-lite0 backbone) on fixtures/aigi, then scores ``--images``
JPEGs (400-800 px) end to end from the files: decode, 256 px native crop
(or the centre 768 px as 3x3 tiles of 256), features, calibrated
probability, Parquet rows.
"""

from __future__ import annotations

import argparse
import dataclasses
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

    from visbatch.core.images import decode_image, pil_to_uint8_chw
    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.sources import find_images
    from visbatch.core.tasks.aigi.detector import FeatureExtractor, Tiling, read_labelled_root, train_detector
    from visbatch.core.tasks.aigi.score import ScoreTask

    model = load_model("efficientnet-lite0", device=args.device)
    groups = ("npr", "bitplane", "spectrum", "layers")
    extractor = FeatureExtractor(model, groups)
    data = read_labelled_root(str(REPO / "fixtures" / "aigi"))
    features = extractor(torch.stack([pil_to_uint8_chw(decode_image(i.path)) for i in data.items]).to(model.device))
    detector, _ = train_detector(features.cpu(), data, groups, extractor.names(), "crop", 256, model.describe())
    tmp = Path(tempfile.mkdtemp())
    make_folder(tmp / "images", args.images)
    items = find_images([str(tmp / "images")])
    results = {"images": len(items), "device": str(model.device), "batch_size": args.batch_size}
    tiled = dataclasses.replace(detector, policy="tiles", tiles=3)
    tiled_extractor = FeatureExtractor(model, groups, tiling=Tiling(256, 3))
    for name, task_detector, task_extractor, tta in (
        ("score_img_s", detector, extractor, False),
        ("score_img_s_tta", detector, extractor, True),
        ("score_img_s_tiles_3x3", tiled, tiled_extractor, False),
    ):
        config = RunConfig(
            output=str(tmp / "scores.parquet"),
            batch_size=args.batch_size,
            workers=args.workers,
            quiet=True,
            overwrite=True,
        )
        run = lambda: run_pipeline(
            ScoreTask(task_detector, task_extractor, tta=tta),
            model,
            items,  # noqa: E731
            config,
        )
        run()
        results[name] = timed(run, len(items))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
