"""Pipeline throughput: visbatch's stages and end to end, against a naive per-image loop.

Run by hand (not part of the tests):

    .venv/bin/python bench/pipeline.py --images 256 --batch-size 32 --workers 2

It builds a folder of JPEGs (random crops of the committed real photos at
typical web sizes), then measures on the same folder, model and device, side
by side in one run:

- decode + preprocess alone (the DataLoader, ``--workers`` processes);
- the model alone on synthetic uint8 batches already in memory;
- visbatch end to end (``classify``: decode, model, Parquet rows);
- the naive loop a user would otherwise write: open, preprocess with
  torchvision/timm transforms, forward one image at a time.

The figure is the ratio of end-to-end images/s to the naive loop's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import make_folder, timed  # noqa: E402  (bench/ is on sys.path when run as a script)
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="default: visbatch's default for the device")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--folder", help="use this folder instead of generating one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig, default_workers, make_loader, run_pipeline
    from visbatch.core.sources import SourceOptions, find_images
    from visbatch.core.tasks.classify import ClassifyTask

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.folder) if args.folder else Path(tmp.name) / "images"
    if not args.folder:
        make_folder(folder, args.images)
    items = find_images([str(folder)], SourceOptions())
    n = len(items)
    model = load_model(args.model, device=args.device, precision=args.precision)
    if args.workers is None:
        args.workers = default_workers(model.device)
    config = RunConfig(
        output=str(Path(tmp.name) / "out.parquet"),
        batch_size=args.batch_size,
        workers=args.workers,
        quiet=True,
        overwrite=True,
    )
    results = {
        "images": n,
        "model": args.model,
        "device": str(model.device),
        "precision": str(model.dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
    }

    def decode_only():
        for _ in make_loader(items, model, config):
            pass

    results["decode_preprocess_img_s"] = timed(decode_only, n)

    synthetic = torch.randint(0, 256, (args.batch_size, 3, *model.preprocess.geometry.crop), dtype=torch.uint8)
    batches = max(1, n // args.batch_size)

    @torch.inference_mode()
    def model_only():
        for _ in range(batches):
            model.class_logits(model.to_input(synthetic))

    model_only()  # warm-up
    results["model_only_img_s"] = timed(model_only, batches * args.batch_size)

    task = ClassifyTask(model, top_k=5)
    results["visbatch_end_to_end_img_s"] = timed(lambda: run_pipeline(task, model, items, config), n)

    import timm.data

    data_config = timm.data.resolve_data_config({}, model=model.module)
    data_config.update(
        mean=model.preprocess.mean, std=model.preprocess.std, interpolation=model.preprocess.geometry.interpolation
    )
    transform = timm.data.create_transform(**data_config)

    # What a user's own loop runs: the same weights in PyTorch's default memory format.
    import copy

    plain_module = copy.deepcopy(model.module).to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def naive_loop():
        rows = []
        for item in items:
            img = Image.open(item.path).convert("RGB")
            x = transform(img)[None].to(model.device, model.dtype)
            probs = plain_module(x).float().softmax(-1)
            rows.append(probs.topk(5))
        return rows

    results["naive_loop_img_s"] = timed(naive_loop, n)
    results["speedup_vs_naive"] = results["visbatch_end_to_end_img_s"] / results["naive_loop_img_s"]
    if args.json:
        print(json.dumps(results))
    else:
        print("| measure | images/s |\n|---|---|")
        for key in ["decode_preprocess_img_s", "model_only_img_s", "visbatch_end_to_end_img_s", "naive_loop_img_s"]:
            print(f"| {key.removesuffix('_img_s')} | {results[key]:.1f} |")
        print(f"| **end to end / naive** | **{results['speedup_vs_naive']:.2f}x** |")
        print({k: v for k, v in results.items() if not k.endswith("_img_s")}, file=sys.stderr)
    tmp.cleanup()


if __name__ == "__main__":
    main()
