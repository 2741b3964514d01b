"""detect-aigi's feature extraction: the feature-group registry, tiling, the extractor and the
feature task the pipeline runs."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from visbatch.core.errors import UsageError
from visbatch.core.images import Geometry
from visbatch.core.models import LoadedModel
from visbatch.core.pipeline import MapOutput
from visbatch.core.tasks.aigi.features import (
    BITPLANE_NAMES,
    NPR_NAMES,
    SPECTRUM_NAMES,
    bitplane_features,
    npr_features,
    spectrum_features,
)


@dataclass(frozen=True)
class FeatureGroup:
    """A detect-aigi feature group: ``compute(extractor, pixels_uint8, pixels_01) -> [B, w]``."""

    compute: Callable[[FeatureExtractor, torch.Tensor, torch.Tensor], torch.Tensor]
    prefix: str  # every column name starts with it (maps a column back to its group)
    names: tuple[str, ...] | None = None  # fixed column names; None: f"{prefix}_{i}" for the output's width
    backbone: bool = False  # runs the --model backbone
    artefact: bool = False  # reads pixel-level traces that --policy resize erases


def _embedding(extractor: FeatureExtractor, pixels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    embedding = extractor.model.encode_image(extractor._model_input(pixels)).float()
    return embedding if extractor.raw_embedding else F.normalize(embedding, dim=-1)


def _layers(extractor: FeatureExtractor, pixels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return extractor.model.encode_layers(extractor._model_input(pixels)).float()


# The registry: adding a group is one function and one entry (the CLI reads the names from here).
FEATURE_GROUP_REGISTRY: dict[str, FeatureGroup] = {
    "embedding": FeatureGroup(_embedding, "emb", backbone=True),
    "layers": FeatureGroup(_layers, "layers", backbone=True),
    "npr": FeatureGroup(lambda e, pixels, x: npr_features(x), "npr", tuple(NPR_NAMES), artefact=True),
    "bitplane": FeatureGroup(
        lambda e, pixels, x: bitplane_features(pixels), "bit", tuple(BITPLANE_NAMES), artefact=True
    ),
    "spectrum": FeatureGroup(lambda e, pixels, x: spectrum_features(x), "spec", tuple(SPECTRUM_NAMES), artefact=True),
}
FEATURE_GROUPS = tuple(FEATURE_GROUP_REGISTRY)
BACKBONE_GROUPS = tuple(g for g, spec in FEATURE_GROUP_REGISTRY.items() if spec.backbone)
ARTEFACT_GROUPS = tuple(g for g, spec in FEATURE_GROUP_REGISTRY.items() if spec.artefact)
POLICIES = ("crop", "resize", "tiles")


def jpeg_round_trip(pixels: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Re-encode uint8 [B, 3, H, W] images as JPEG and decode them again (on CPU)."""
    out = []
    for image in pixels.cpu():
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out).to(pixels.device)


@dataclass
class Tiling:
    """``--policy tiles``: the centre (k * size) square at native resolution, cut into k x k tiles
    of the detector's size. An image's features are the mean over the tiles that lie inside it
    (at least half of their area; the best-covered one for an image smaller than a tile): the
    classifier is linear, so that is the mean of the tiles' logits, evidence from every tile."""

    size: int
    per_side: int

    def split(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, k*size, k*size] -> [B * k * k, 3, size, size], tiles in row-major order."""
        b, c = images.shape[:2]
        k, n = self.per_side, self.size
        tiles = images[:, :, : k * n, : k * n].unfold(2, n, n).unfold(3, n, n)  # [B, C, k, k, n, n]
        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(b * k * k, c, n, n).contiguous()

    def inside(self, records) -> torch.Tensor:
        """[B, k*k] bool: the tiles that show the image rather than the padding around it."""
        k, n = self.per_side, self.size
        side = k * n
        masks = []
        for record in records:
            h, w = min(record.height or side, side), min(record.width or side, side)
            top, left = (side - h) // 2, (side - w) // 2
            edges = torch.arange(k) * n
            rows = (torch.minimum(edges + n, torch.tensor(top + h)) - torch.maximum(edges, torch.tensor(top))).clamp(
                min=0
            ) / n
            cols = (torch.minimum(edges + n, torch.tensor(left + w)) - torch.maximum(edges, torch.tensor(left))).clamp(
                min=0
            ) / n
            cover = (rows.view(-1, 1) * cols.view(1, -1)).flatten()
            mask = cover >= 0.5
            if not mask.any():
                mask = cover == cover.max()
            masks.append(mask)
        return torch.stack(masks)

    @staticmethod
    def mean_inside(per_tile: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """[B, D]: the mean of ``per_tile`` [B, k*k, D] over the tiles marked in ``inside`` [B, k*k]."""
        weights = inside.to(per_tile.device).float().unsqueeze(-1)
        return (per_tile * weights).sum(dim=1) / weights.sum(dim=1)


@dataclass
class FeatureExtractor:
    """Feature vector of uint8 crops: the chosen groups, concatenated, with their names."""

    model: LoadedModel | None
    groups: tuple[str, ...]
    raw_embedding: bool = False  # UnivFD's head reads unnormalized embeddings
    tiling: Tiling | None = None  # --policy tiles
    _widths: dict | None = field(default=None, repr=False)  # columns per group, known after a call

    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, k*k, D]: the features of each tile (``tiling`` set)."""
        tiles = self.tiling.split(pixels)
        return self(tiles).view(pixels.shape[0], self.tiling.per_side**2, -1)

    def image_features(self, pixels: torch.Tensor, records) -> torch.Tensor:
        """[B, D]: the features of each image under the policy (the tiles' mean for ``tiles``)."""
        if self.tiling is None:
            return self(pixels)
        return self.tiling.mean_inside(self.tile_features(pixels), self.tiling.inside(records))

    def names(self) -> list[str]:
        """Feature names in column order (the backbone groups' widths come from one tiny probe)."""
        if self._widths is None:
            self(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        names: list[str] = []
        for group in self.groups:
            spec = FEATURE_GROUP_REGISTRY[group]
            names += list(spec.names) if spec.names else [f"{spec.prefix}_{i}" for i in range(self._widths[group])]
        return names

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        parts = []
        x = pixels.float() / 255
        for group in self.groups:
            spec = FEATURE_GROUP_REGISTRY.get(group)
            if spec is None:
                raise UsageError(f"unknown feature group {group!r} (choose from {', '.join(FEATURE_GROUPS)})")
            parts.append(spec.compute(self, pixels, x))
        self._widths = {group: part.shape[1] for group, part in zip(self.groups, parts)}
        return torch.cat([p.float().to(pixels.device) for p in parts], dim=1)

    def _model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.model.preprocess.geometry.crop
        resized = (
            F.interpolate(pixels.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )
        return self.model.to_input(resized)

    @property
    def has_patch_embeddings(self) -> bool:
        return "embedding" in self.groups and self.model is not None and self.model.has_patch_tokens

    @torch.inference_mode()
    def patch_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, grid_h, grid_w, D]: each ViT patch token's embedding, normalized as the image
        embedding is (see :meth:`LoadedModel.encode_patches`)."""
        patches = self.model.encode_patches(self._model_input(pixels)).float()
        return patches if self.raw_embedding else F.normalize(patches, dim=-1)


def policy_geometry(policy: str, size: int, tiles: int = 1) -> Geometry:
    """``crop``: centre crop at native resolution (padding small images); ``resize``: shortest side to
    ``size`` then centre crop (destroys up-sampling traces: warned about for artefact groups);
    ``tiles``: centre crop of ``tiles`` x ``tiles`` tiles of ``size`` at native resolution."""
    if policy == "crop":
        return Geometry(resize=0, crop=(size, size), resize_mode="none")
    if policy == "tiles":
        return Geometry(resize=0, crop=(tiles * size, tiles * size), resize_mode="none")
    if policy == "resize":
        return Geometry(resize=size, crop=(size, size), interpolation="bilinear")
    raise UsageError(f"unknown policy {policy!r} (crop, resize or tiles)")


class FeatureTask:
    """Map stage shared by train and eval: one feature vector per image."""

    name = "detect-aigi-features"

    def __init__(self, extractor: FeatureExtractor, geometry: Geometry, normalize_format: bool = False):
        self.extractor, self.geometry, self.normalize_format = extractor, geometry, normalize_format

    def fields(self):
        return [pa.field("features", pa.list_(pa.float32()))]

    def options(self):
        return {
            "groups": list(self.extractor.groups),
            "geometry": self.geometry.as_dict(),
            "normalize_format": self.normalize_format,
        }

    def map(self, images, records):
        if self.normalize_format:
            images = jpeg_round_trip(images)
        return MapOutput([{"features": f.cpu().numpy()} for f in self.extractor.image_features(images, records)])

    def summary(self):
        return {}
