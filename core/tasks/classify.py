"""Classification: top-k classes per image, with class activation maps as overlays.

The engine's smoke job and a useful command on its own: any classifier the
model resolver knows (``efficientnet-lite0``, ``timm:NAME``) labels a folder.

For CNNs that end in global average pooling and a linear layer (most timm
classifiers), the overlay is the class activation map of the top-1 class
(Zhou et al., "Learning Deep Features for Discriminative Localization",
CVPR 2016): ``CAM_c(h, w) = sum_k W[c, k] * F[k, h, w]``, exact for such
heads since the logit is the spatial mean of the CAM plus the bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import torch

from visbatch.core.errors import UsageError
from visbatch.core.images import Record
from visbatch.core.models import LoadedModel
from visbatch.core.pipeline import MapOutput


class ClassifyTask:
    name = "classify"

    def __init__(self, model: LoadedModel, top_k: int = 5, overlays: bool = False):
        if "text_embedding" in model.capabilities and "class_logits" not in model.capabilities:
            raise UsageError(f"classify needs a classifier; {model.spec} is a CLIP model (use clip-score --labels)")
        model.require("class_logits")
        self.model = model
        self.top_k = min(top_k, len(model.class_names or [])) or top_k
        self.want_overlays = overlays
        self._classifier = model.module.get_classifier() if hasattr(model.module, "get_classifier") else None
        self.cam_available = isinstance(self._classifier, torch.nn.Linear) and self._features_are_maps()
        self._top1_counts: dict[str, int] = {}

    @torch.inference_mode()
    def _features_are_maps(self) -> bool:
        """Whether the head reads spatial maps [B, C, H, W] (a CNN), not tokens (a ViT): one probe image."""
        probe = torch.zeros(1, 3, *self.model.preprocess.geometry.crop, dtype=torch.uint8, device=self.model.device)
        return self.model.module.forward_features(self.model.to_input(probe)).ndim == 4

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("top_labels", pa.list_(pa.string())),
            pa.field("top_indices", pa.list_(pa.int32())),
            pa.field("top_probs", pa.list_(pa.float32())),
        ]

    def options(self) -> dict:
        return {"top_k": self.top_k}

    @torch.inference_mode()
    def map(self, images: torch.Tensor, records: Sequence[Record]) -> MapOutput:
        module = self.model.module
        x = self.model.to_input(images)
        features = module.forward_features(x)
        logits = module.forward_head(features).float()
        probs, indices = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        overlays = None
        if self.want_overlays and self.cam_available and features.ndim == 4:
            weights = self._classifier.weight[indices[:, 0]].to(features.dtype)  # [B, C]
            cams = torch.einsum("bc,bchw->bhw", weights, features).float()
            overlays = list(cams.cpu().numpy())
        names = self.model.class_names
        probs_l, idx_l = probs.cpu().tolist(), indices.cpu().tolist()
        rows = []
        for p, i in zip(probs_l, idx_l):
            labels = [names[j] for j in i]
            rows.append({"top_labels": labels, "top_indices": i, "top_probs": p})
        return MapOutput(rows, overlays)

    summary_columns = ("top_labels",)

    def observe(self, rows: list[dict]) -> None:
        for row in rows:
            if row["top_labels"]:
                top1 = row["top_labels"][0]
                self._top1_counts[top1] = self._top1_counts.get(top1, 0) + 1

    def summary(self) -> dict:
        common = sorted(self._top1_counts.items(), key=lambda kv: -kv[1])[:5]
        return {"most_common_top1": ", ".join(f"{k} ({v})" for k, v in common)} if common else {}
