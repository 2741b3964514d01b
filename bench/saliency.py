"""saliency throughput against Captum and pytorch-grad-cam, with the maps' agreement.

Run by hand:

    .venv/bin/python bench/saliency.py --images 32 --batch-size 8 --workers 2

Same folder, model (``efficientnet-lite0``), device, batch size and method
settings for every pair, end to end from the files (decode and preprocess
included: the peers get a plain loop that opens and transforms each image,
as a user's script would, then one ``attribute`` call per batch):

- Integrated Gradients: visbatch vs Captum ``IntegratedGradients`` with
  ``internal_batch_size`` equal to visbatch's;
- Saliency: visbatch ``gradient`` vs Captum ``Saliency``;
- SmoothGrad: visbatch ``smoothgrad`` vs Captum ``NoiseTunnel(Saliency)``;
- Grad-CAM: visbatch ``gradcam`` vs pytorch-grad-cam ``GradCAM`` on the same layer.

Beside each ratio: the largest difference between the two tools' maps,
relative to the largest map value (Captum's raw attributions vs visbatch's
``raw``; for Grad-CAM both min-max normalized at input resolution, as
pytorch-grad-cam returns them). SmoothGrad's noise differs between tools, so
its difference is that of two independent noise draws.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from visbatch.core.images import decode_image, pil_to_uint8_chw, resize_and_crop
    from visbatch.core.models import find_spatial_layer, load_model
    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.sources import SourceOptions, find_images
    from visbatch.core.tasks.saliency import methods
    from visbatch.core.tasks.saliency.task import SaliencyOptions, SaliencyTask

    tmp = Path(tempfile.mkdtemp())
    make_folder(tmp / "images", args.images)
    items = find_images([str(tmp / "images")], SourceOptions())
    n = len(items)
    model = load_model("efficientnet-lite0", device=args.device, precision=args.precision)
    device = model.device
    internal = args.batch_size * (4 if device.type == "cuda" else 2)
    spatial = find_spatial_layer(model)
    layer_module = dict(model.module.named_modules())[spatial.name]
    forward = lambda x: model.module(x).float()  # noqa: E731
    mean = torch.tensor(model.preprocess.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess.std, device=device).view(1, 3, 1, 1)
    black = ((0 - mean) / std).to(model.dtype)
    pixel_range = (float(black.min()), float(((1 - mean) / std).max()))
    sigma = 0.15

    def peer_batches(need_targets=True):
        """What a user's loop does: open, preprocess, stack, move, one batch at a time.

        Captum needs the target class up front (a no-grad forward); pytorch-grad-cam picks it itself.
        """
        for start in range(0, n, args.batch_size):
            chunk = items[start : start + args.batch_size]
            images = torch.stack(
                [pil_to_uint8_chw(resize_and_crop(decode_image(it.path), model.preprocess.geometry)) for it in chunk]
            )
            x = model.to_input(images)
            if not need_targets:
                yield x, None
                continue
            with torch.no_grad():
                targets = forward(x).argmax(dim=1)
            yield x, targets

    def visbatch_run(method, params):
        options = SaliencyOptions(method=method, params=params, internal_batch_size=internal, map_size=8)
        config = RunConfig(
            output=str(tmp / f"{method}.parquet"),
            batch_size=args.batch_size,
            workers=args.workers,
            quiet=True,
            overwrite=True,
        )
        return lambda: run_pipeline(SaliencyTask(model, options), model, items, config)

    cases = {
        "integrated-gradients": (
            visbatch_run("integrated-gradients", {"steps": args.steps}),
            lambda x, t: IntegratedGradients(forward).attribute(
                x,
                baselines=black.expand_as(x),
                target=t,
                n_steps=args.steps,
                method="gausslegendre",
                internal_batch_size=internal,
            ),
            lambda x, t: (
                methods.integrated_gradients(
                    forward, x, t, steps=args.steps, black=black, internal_batch_size=internal
                ).raw
            ),
        ),
        "gradient": (
            visbatch_run("gradient", {}),
            lambda x, t: Saliency(forward).attribute(x, target=t, abs=True),
            lambda x, t: methods.gradient(forward, x, t).raw,
        ),
        "smoothgrad": (
            visbatch_run("smoothgrad", {"samples": args.samples, "sigma": sigma}),
            lambda x, t: NoiseTunnel(Saliency(forward)).attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=args.samples,
                nt_samples_batch_size=max(1, internal // len(x)),
                stdevs=sigma * (pixel_range[1] - pixel_range[0]),
                target=t,
                abs=True,
            ),
            lambda x, t: (
                methods.smoothgrad(
                    forward,
                    x,
                    t,
                    samples=args.samples,
                    sigma=sigma,
                    pixel_range=pixel_range,
                    internal_batch_size=internal,
                ).raw
            ),
        ),
    }
    # pytorch-grad-cam backpropagates into the weights: give it the same model with gradients on,
    # as a freshly loaded model has them.
    import copy

    peer_module = copy.deepcopy(model.module).requires_grad_(True)
    grad_cam = GradCAM(model=peer_module, target_layers=[dict(peer_module.named_modules())[spatial.name]])

    def gradcam_peer(x, t):
        targets = None if t is None else [ClassifierOutputTarget(int(i)) for i in t]
        return torch.from_numpy(grad_cam(input_tensor=x, targets=targets))

    def gradcam_ours(x, t):
        maps = methods.gradcam(forward, x, t, layer=methods.LayerAccess(layer_module, spatial)).maps
        lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
        hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
        return (maps - lo) / (hi - lo + 1e-7)

    cases["gradcam"] = (visbatch_run("gradcam", {}), gradcam_peer, gradcam_ours)

    results = {
        "images": n,
        "device": str(device),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "ig_steps": args.steps,
        "smoothgrad_samples": args.samples,
        "internal_batch_size": internal,
    }
    rows = []
    for name, (ours_run, peer_fn, ours_fn) in cases.items():
        ours_run()  # warm-up
        ours_speed = timed(ours_run, n)

        def peer_run():
            for x, t in peer_batches(need_targets=name != "gradcam"):
                peer_fn(x, t)

        peer_speed = timed(peer_run, n)
        x, t = next(peer_batches())
        peer_maps, our_maps = peer_fn(x, t).detach().float().cpu(), ours_fn(x, t).detach().float().cpu()
        max_diff = float((peer_maps - our_maps).abs().max() / peer_maps.abs().max().clamp(min=1e-12))
        peer = (
            "pytorch-grad-cam GradCAM"
            if name == "gradcam"
            else {
                "integrated-gradients": "Captum IntegratedGradients",
                "gradient": "Captum Saliency",
                "smoothgrad": "Captum NoiseTunnel(Saliency)",
            }[name]
        )
        rows.append((name, peer, ours_speed, peer_speed, ours_speed / peer_speed, max_diff))
        results[name] = {
            "visbatch_img_s": ours_speed,
            "peer": peer,
            "peer_img_s": peer_speed,
            "ratio": ours_speed / peer_speed,
            "max_rel_map_difference": max_diff,
        }
    if args.json:
        print(json.dumps(results))
    else:
        print("| method | peer | visbatch img/s | peer img/s | ratio | max map difference |\n|---|---|---|---|---|---|")
        for name, peer, ours_speed, peer_speed, ratio, diff in rows:
            print(f"| {name} | {peer} | {ours_speed:.2f} | {peer_speed:.2f} | {ratio:.2f}x | {diff:.1e} |")
        print({k: v for k, v in results.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
