"""detect-aigi's labelled inputs: the ForenSynths layout or --real/--fake folders, and the
format confounds between the classes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from PIL import Image

from visbatch.core.images import ImageItem, InputError
from visbatch.core.plan import InputSet
from visbatch.core.sources import SourceOptions, find_images


@dataclass
class LabelledItems:
    items: list[ImageItem]
    labels: list[int]  # 1 = fake
    generators: list[str]
    reads: InputSet = field(default_factory=InputSet)  # every folder and file the listing read


def read_labelled_root(root: str) -> LabelledItems:
    """ForenSynths/UnivFD layout: ``ROOT/0_real``, ``ROOT/1_fake``, or ``ROOT/<generator>/0_real|1_fake``
    (also one level deeper: ``ROOT/<generator>/<class>/0_real``)."""
    if not os.path.isdir(root):
        raise InputError(f"input not found: {root}")
    out = LabelledItems([], [], [])
    for item in find_images([root], SourceOptions(), reads=out.reads):
        parts = item.relpath.split("/")
        label_dirs = [i for i, p in enumerate(parts[:-1]) if p in ("0_real", "1_fake")]
        if not label_dirs:
            continue
        at = label_dirs[-1]
        out.items.append(item)
        out.labels.append(1 if parts[at] == "1_fake" else 0)
        out.generators.append(parts[0] if at > 0 else "default")
    if not out.items:
        raise InputError(f"{root}: no images under 0_real/ or 1_fake/ folders")
    return out


def read_labelled_folders(real: Sequence[str], fake: Sequence[str]) -> LabelledItems:
    out = LabelledItems([], [], [])
    for label, folders in ((0, real), (1, fake)):
        for folder in folders:
            found = find_images([folder], SourceOptions(), reads=out.reads)
            if not found:
                raise InputError(f"no images in {folder}")
            out.items += found
            out.labels += [label] * len(found)
            out.generators += ["default"] * len(found)
    return out


def format_confounds(data: LabelledItems) -> list[str]:
    """Warnings where real and fake differ in file format, size or JPEG quality (the classic confound)."""
    warnings = []
    stats: dict[int, dict[str, Any]] = {
        0: {"formats": {}, "pixels": [], "quality": []},
        1: {"formats": {}, "pixels": [], "quality": []},
    }
    for item, label in zip(data.items, data.labels):
        try:
            with Image.open(item.path) as img:
                fmt = img.format or "?"
                stats[label]["formats"][fmt] = stats[label]["formats"].get(fmt, 0) + 1
                stats[label]["pixels"].append(img.size[0] * img.size[1])
                if fmt == "JPEG" and getattr(img, "quantization", None):
                    table = cast(Any, img).quantization.get(0)  # JpegImageFile's, not in ImageFile's stub
                    stats[label]["quality"].append(float(np.mean(table)) if table else np.nan)
        except OSError:
            continue
    real, fake = stats[0], stats[1]
    if set(real["formats"]) != set(fake["formats"]):
        warnings.append(
            f"real images are {dict(real['formats'])} but fake images are {dict(fake['formats'])}: "
            "a detector can learn the file format; use --normalize-format"
        )
    if real["pixels"] and fake["pixels"]:
        a, b = np.median(real["pixels"]), np.median(fake["pixels"])
        if max(a, b) > 1.5 * min(a, b):
            warnings.append(f"median image size differs (real {a:.0f} px, fake {b:.0f} px): size can give the answer")
    if real["quality"] and fake["quality"]:
        a, b = np.nanmedian(real["quality"]), np.nanmedian(fake["quality"])
        if abs(a - b) > 0.25 * max(a, b, 1e-9):
            warnings.append(
                f"JPEG quantization differs (mean luminance table: real {a:.1f}, fake {b:.1f}): "
                "compression can give the answer; use --normalize-format"
            )
    return warnings
