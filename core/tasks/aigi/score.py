"""``detect-aigi score``: the task that scores images with a detector (TTA, heatmaps)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from visbatch.core.pipeline import MapOutput
from visbatch.core.tasks.aigi.detector import Detector
from visbatch.core.tasks.aigi.extract import FeatureExtractor, Tiling, jpeg_round_trip, policy_geometry


class ScoreTask:
    """``score``: calibrated p_fake, a label, each group's share, optional TTA and patch heatmaps."""

    name = "detect-aigi"

    def __init__(
        self,
        detector: Detector,
        extractor: FeatureExtractor,
        tta: bool = False,
        heatmaps: bool = False,
        heatmap_tiles: int = 4,
    ):
        self.detector, self.extractor, self.tta, self.heatmaps = detector, extractor, tta, heatmaps
        self.heatmap_tiles = heatmap_tiles  # crop and resize policies: sub-tiles of the crop
        self.patch_heatmaps = heatmaps and extractor.has_patch_embeddings and extractor.tiling is None
        self.geometry = policy_geometry(detector.policy, detector.size, detector.tiles)
        self._counts = {"real": 0, "fake": 0, "unsure": 0}

    def fields(self):
        fields = [pa.field("p_fake", pa.float32()), pa.field("label", pa.string())]
        fields += [pa.field(f"score_{g}", pa.float32()) for g in self.detector.groups]
        if self.tta:
            fields += [pa.field("p_fake_jpeg", pa.float32()), pa.field("p_fake_resized", pa.float32())]
        return fields

    def options(self):
        return {
            "threshold": self.detector.threshold,
            "policy": self.detector.policy,
            "size": self.detector.size,
            "groups": list(self.detector.groups),
            "tta": self.tta,
            "tta_variants": "JPEG quality 90 re-encode; 0.9x bilinear resize" if self.tta else None,
            "tiles": self.detector.tiles if self.detector.policy == "tiles" else None,
            "heatmap": None if not self.heatmaps else self._heatmap_kind(),
        }

    def _heatmap_kind(self) -> str:
        if self.extractor.tiling is not None:
            k = self.extractor.tiling.per_side
            return f"{k}x{k} tiles of {self.detector.size} px (the detector's tiles)"
        if self.patch_heatmaps:
            return "ViT patch tokens"
        return f"{self.heatmap_tiles}x{self.heatmap_tiles} tiles"

    def _probability(self, pixels, records):
        return self.detector.probability(self.extractor.image_features(pixels, records))

    def map(self, images, records):
        per_tile = inside = None
        if self.extractor.tiling is not None:
            per_tile = self.extractor.tile_features(images)
            inside = self.extractor.tiling.inside(records)
            features = self.extractor.tiling.mean_inside(per_tile, inside)
        else:
            features = self.extractor(images)
        p = self.detector.probability(features)
        groups = self.detector.group_scores(features)
        fake = p >= self.detector.threshold
        labels = ["fake" if f else "real" for f in fake.tolist()]
        rows = [
            {"p_fake": float(p[i]), "label": labels[i], **{f"score_{g}": float(v[i]) for g, v in groups.items()}}
            for i in range(len(records))
        ]
        if self.tta:
            jpeg = self._probability(jpeg_round_trip(images, 90), records)
            size = images.shape[-1]
            small = F.interpolate(
                images.float(), scale_factor=0.9, mode="bilinear", antialias=True, align_corners=False
            )
            pad = size - small.shape[-1]
            resized = F.pad(small, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), mode="reflect")
            resized = self._probability(resized.round().clamp(0, 255).to(torch.uint8), records)
            for i, row in enumerate(rows):
                row.update(p_fake_jpeg=float(jpeg[i]), p_fake_resized=float(resized[i]))
                verdicts = {
                    bool(p[i] >= self.detector.threshold),
                    bool(jpeg[i] >= self.detector.threshold),
                    bool(resized[i] >= self.detector.threshold),
                }
                if len(verdicts) > 1:
                    row["label"] = "unsure"
        overlays = None
        if self.heatmaps and per_tile is not None:
            overlays = self._policy_tile_maps(per_tile, inside, p)
        elif self.patch_heatmaps:
            overlays = self._patch_maps(images, features)
        elif self.heatmaps:
            overlays = self._tile_maps(images)
        return MapOutput(rows, overlays)

    def _patch_maps(self, images, features) -> list[np.ndarray]:
        """p_fake of each ViT patch: the image's feature vector with its embedding replaced by the
        patch token's embedding (the other groups keep their image-level values)."""
        patches = self.extractor.patch_embeddings(images)  # [B, gh, gw, D]
        b, gh, gw, d = patches.shape
        columns = [i for i, name in enumerate(self.detector.feature_names) if name.startswith("emb_")]
        per_patch = features.float().cpu().repeat_interleave(gh * gw, dim=0)
        per_patch[:, columns] = patches.reshape(b * gh * gw, d).cpu()
        return list(self.detector.probability(per_patch).view(b, gh, gw).numpy())

    def _policy_tile_maps(self, per_tile, inside, p) -> list[np.ndarray]:
        """p_fake of each of the detector's tiles; tiles over padding show the image's p_fake."""
        b, count, d = per_tile.shape
        k = self.extractor.tiling.per_side
        tile_p = self.detector.probability(per_tile.reshape(b * count, d)).view(b, count)
        tile_p = torch.where(inside, tile_p, p.view(-1, 1).expand(b, count))
        return list(tile_p.view(b, k, k).numpy())

    def _tile_maps(self, images) -> list[np.ndarray]:
        """p_fake of each of k x k sub-tiles of the (square) crop: evidence from every part."""
        k = self.heatmap_tiles
        tiling = Tiling(min(images.shape[-2:]) // k, k)
        p = self.detector.probability(self.extractor(tiling.split(images))).view(images.shape[0], k, k)
        return list(p.cpu().numpy())

    summary_columns = ("label",)

    def observe(self, rows: list[dict]) -> None:
        for row in rows:
            self._counts[row["label"]] += 1

    def summary(self):
        return {f"labelled_{k}": v for k, v in self._counts.items()}
