"""clip-score throughput against torchmetrics' CLIPScore and a naive open_clip loop.

Run by hand (needs the bench extra: ``pip install -e '.[bench]'``):

    .venv/bin/python bench/clip_score.py --images 128 --batch-size 32 --workers 2

Same folder (JPEGs with one caption each), device and batch size for all
three, side by side in one run, end to end from files on disk:

- visbatch ``clip-score`` (decode workers, device-side normalization,
  batched image and text towers, Parquet output);
- torchmetrics ``CLIPScore`` fed batches of decoded images, given a
  randomly initialised ``transformers`` CLIP ViT-B/32 (no download), with
  a CLIP tokenizer built from open_clip's BPE files;
- a naive loop with open_clip: open, preprocess, encode image, encode
  caption, cosine, one image at a time.

visbatch and the naive loop run open_clip's ViT-B-32 architecture with
random weights: timing does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import make_folder, timed
from PIL import Image


def clip_processor_offline(tmp: Path):
    """transformers' CLIPProcessor with CLIP's BPE vocabulary taken from open_clip's files."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    simple = SimpleTokenizer()
    # open_clip names the special tokens <start_of_text>/<end_of_text>; transformers uses OpenAI's names.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in simple.encoder.items()}
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"))
    return CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.sources import SourceOptions, find_images
    from visbatch.core.tasks.clip_score import ClipScoreOptions, ClipScoreTask
    from visbatch.core.texts import TextTable

    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "images"
    paths = make_folder(folder, args.images)
    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "cat", "cup", "rocket", "sky", "person", "red", "table", "night", "launch"]
    captions = {
        p.relative_to(folder).as_posix(): " ".join(rng.choice(words, size=int(rng.integers(5, 15)))) for p in paths
    }
    (tmp / "captions.jsonl").write_text(
        "".join(json.dumps({"path": k, "caption": v}) + "\n" for k, v in captions.items())
    )
    items = find_images([str(folder)], SourceOptions())
    model = load_model("ViT-B-32", device=args.device, precision=args.precision)
    device = model.device
    n = len(items)
    results = {
        "images": n,
        "device": str(device),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "model": "ViT-B-32 (random weights, same size for all)",
    }

    table = TextTable.read(str(tmp / "captions.jsonl"), "path", "caption", [str(folder)])
    config = RunConfig(
        output=str(tmp / "out.parquet"), batch_size=args.batch_size, workers=args.workers, quiet=True, overwrite=True
    )

    def visbatch_run():
        run_pipeline(ClipScoreTask(model, ClipScoreOptions(captions=table)), model, items, config)

    visbatch_run()  # warm-up (also leaves the output in place for the parity figure below)
    results["visbatch_img_s"] = timed(visbatch_run, n)

    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    @torch.inference_mode()
    def naive_loop():
        out = []
        for item in items:
            image = preprocess(Image.open(item.path).convert("RGB"))[None].to(device, model.dtype)
            image_e = model.module.encode_image(image, normalize=True)
            text_e = model.module.encode_text(tokenizer([captions[item.relpath]]).to(device), normalize=True)
            out.append(100 * (image_e * text_e).sum().clamp(min=0).item() * 0.025)
        return out

    results["naive_open_clip_img_s"] = timed(naive_loop, n)

    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPConfig, CLIPModel
    except ImportError:
        results["torchmetrics_img_s"] = None
    else:
        processor = clip_processor_offline(tmp)
        hf_model = CLIPModel(CLIPConfig()).eval()
        metric = CLIPScore(model_name_or_path=lambda: (hf_model, processor)).to(device)

        @torch.inference_mode()
        def torchmetrics_run():
            for start in range(0, n, args.batch_size):
                chunk = items[start : start + args.batch_size]
                images = [
                    torch.from_numpy(np.asarray(Image.open(it.path).convert("RGB"))).permute(2, 0, 1) for it in chunk
                ]
                metric.update(images, [captions[it.relpath] for it in chunk])
            return metric.compute()

        results["torchmetrics_img_s"] = timed(torchmetrics_run, n)

    peers = [v for k, v in results.items() if k in ("naive_open_clip_img_s", "torchmetrics_img_s") and v]
    results["speedup_vs_fastest_peer"] = results["visbatch_img_s"] / max(peers)
    if args.json:
        print(json.dumps(results))
    else:
        print("| run | images/s | visbatch / run |\n|---|---|---|")
        for key in ["visbatch_img_s", "torchmetrics_img_s", "naive_open_clip_img_s"]:
            value = results[key]
            ratio = results["visbatch_img_s"] / value if value else float("nan")
            print(f"| {key.removesuffix('_img_s')} | {value:.1f} | {ratio:.2f}x |" if value else f"| {key} | n/a | |")
        print({k: v for k, v in results.items() if not k.endswith("_img_s")})


if __name__ == "__main__":
    main()
