"""detect-aigi on generators it never saw: leave one generator out, the whole training each time.

The development set is ``fixtures/photo_sets.aigi_dev_set``: 8 up-sampling
"generators" (nearest, bilinear, bicubic, transposed-convolution 2x, each
with and without JPEG), each on its own photos, plus the committed
text-to-image outputs. For each generator, a detector is trained on the
other eight (its own inner folds and group selection never see the held-out
one) and its AP measured on the held-out generator. Compared side by side:

- ``concat``: one logistic regression over the concatenated default groups
  (L2 1e-2): the method before per-group fusion;
- each group alone (its L2 chosen on inner folds);
- ``fused``: per-group regressions, stacked, all default groups;
- ``selected``: the same with leave-one-generator-out group selection (the default).

    .venv/bin/python bench/aigi_heldout.py [--crops 10]

Prints one JSON row per held-out generator, then the means.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
from photo_sets import DEV_CROP, aigi_dev_set  # noqa: E402

DEFAULT_GROUPS = ("npr", "bitplane", "spectrum", "layers")
ALL_GROUPS = ("npr", "bitplane", "spectrum", "layers", "embedding")


def dev_features(root: Path, tmp: Path, groups=ALL_GROUPS, backbone=None):
    """(features [n, D], labels [n], generators, feature names) of the development set."""
    import torch

    from visbatch.core.models import DeviceOnly, load_model
    from visbatch.core.pipeline import RunConfig
    from visbatch.core.tasks.aigi.detector import FeatureExtractor, policy_geometry, read_labelled_root
    from visbatch.core.tasks.aigi.job import compute_features

    data = read_labelled_root(str(root))
    if backbone is None and any(g in ("layers", "embedding") for g in groups):
        backbone = load_model("efficientnet-lite0", device="cpu", precision="fp32")
    extractor = FeatureExtractor(backbone, tuple(groups))
    config = RunConfig(output=str(tmp / "features.parquet"), batch_size=32, workers=0, quiet=True, overwrite=True)
    keep, vectors, errors = compute_features(
        data, extractor, policy_geometry("crop", DEV_CROP), False, backbone or DeviceOnly("cpu"), config
    )
    assert not errors, errors[:3]
    return vectors, torch.tensor(data.labels), data.generators, extractor.names()


def compare(
    features, labels, generators, names, groups=DEFAULT_GROUPS, with_fused: bool = False
) -> dict[str, dict[str, float]]:
    """{configuration: {held-out generator: AP}}: concat, each group alone, selected (and fused
    without selection, ``with_fused``); ``selected_groups`` names the groups chosen each time."""
    import numpy as np
    import torch

    from visbatch.core.tasks.aigi.classifier import average_precision, fit_logistic
    from visbatch.core.tasks.aigi.detector import group_columns
    from visbatch.core.tasks.aigi.fusion import held_out_generator_ap

    columns = group_columns(names, groups)
    results: dict[str, dict] = {"concat": {}}
    gens = np.asarray(generators, dtype=object)
    concat = torch.cat([columns[g] for g in groups]).sort().values
    for name in sorted(set(generators)):
        held = torch.from_numpy(gens == name)
        model = fit_logistic(features[~held][:, concat], labels[~held], l2=1e-2)
        results["concat"][name] = average_precision(labels[held], model.logits(features[held][:, concat]))
    selected = held_out_generator_ap(features, labels, generators, columns, select=True)
    for group in groups:
        results[group] = {k: v["group_ap"][group] for k, v in selected.items()}
    extra = [g for g in ("embedding",) if g not in groups and any(n.startswith("emb_") for n in names)]
    for group in extra:
        alone = held_out_generator_ap(features, labels, generators, group_columns(names, [group]))
        results[group] = {k: v["ap"] for k, v in alone.items()}
    if with_fused:
        fused = held_out_generator_ap(features, labels, generators, columns, select=False)
        results["fused"] = {k: v["ap"] for k, v in fused.items()}
    results["selected"] = {k: v["ap"] for k, v in selected.items()}
    results["selected_groups"] = {k: ",".join(v["selected"]) for k, v in selected.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crops", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = aigi_dev_set(Path(tmp) / "dev", crops_per_photo=args.crops)
        features, labels, generators, names = dev_features(root, Path(tmp))
        results = compare(features, labels, generators, names, with_fused=True)
    for generator in sorted(set(generators)):
        print(json.dumps({"held_out": generator, **{k: v[generator] for k, v in results.items()}}))
    means = {k: sum(v.values()) / len(v) for k, v in results.items() if k != "selected_groups"}
    print(json.dumps({"held_out": "mean", **means}))


if __name__ == "__main__":
    main()
