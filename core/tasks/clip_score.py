"""CLIPScore, RefCLIPScore, zero-shot labels and embeddings.

The maths are pure functions of embeddings (:func:`clip_score`,
:func:`ref_clip_score`, :func:`zero_shot_probabilities`,
:func:`ensemble_text_embeddings`); :class:`ClipScoreTask` is the thin
stateful part that the pipeline calls per batch: it finds each image's text,
encodes every unique text once (in batches, cached), and turns embeddings
into rows.

How the numbers relate to torchmetrics' ``CLIPScore``: torchmetrics reports
``100 * cos`` (not ``2.5 * max(cos, 0)``), averages over the batch and clamps
the *mean* at 0 rather than each pair, defaults to
``openai/clip-vit-large-patch14``, and truncates long captions by slicing the
token ids, which drops the end-of-text token whose position CLIP pools, so
scores of long captions collapse. For captions within the context length,
``torchmetrics_score = 40 * clip_score`` wherever the cosine is positive.

The texts themselves (captions, prompt templates, the cached text encoder) come from
:mod:`visbatch.core.texts`, which saliency and select-data share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from visbatch.core.errors import UsageError
from visbatch.core.images import Record
from visbatch.core.models import LoadedModel
from visbatch.core.pipeline import MapOutput
from visbatch.core.texts import (
    DEFAULT_TEMPLATE,
    TextEncoder,
    TextTable,
    caption_for,
    ensemble_text_embeddings,
    fill_template,
    read_sidecar_caption,
)

DEFAULT_WEIGHT = 2.5


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def clip_score(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, weight: float = DEFAULT_WEIGHT
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPScore per image-text pair, and the raw cosine.

    ``CLIP-S(c, v) = w * max(cos(E_v, E_c), 0)`` with ``w = 2.5``.

    Reference: Hessel et al., "CLIPScore: A Reference-free Evaluation Metric
    for Image Captioning", EMNLP 2021, eq. (1).

    Args:
        image_embeddings: [N, D] image embeddings (normalized here).
        text_embeddings: [N, D] embeddings of each image's text (normalized here).
        weight: ``w``; 2.5 stretches the usual range of CLIP cosines towards [0, 1].

    Returns:
        ``(scores, cosines)``, both [N] float32.
    """
    image = F.normalize(image_embeddings.float(), dim=-1)
    text = F.normalize(text_embeddings.float(), dim=-1)
    cosine = (image * text).sum(dim=-1)
    return weight * cosine.clamp(min=0), cosine


def ref_clip_score(
    clip_scores: torch.Tensor,
    text_embeddings: torch.Tensor,
    reference_embeddings: torch.Tensor,
    reference_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RefCLIPScore: harmonic mean of CLIP-S and the best reference similarity.

    ``RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(E_c, E_r), 0))``

    Reference: Hessel et al. 2021, eq. (2).

    Args:
        clip_scores: [N] CLIP-S of each pair (weight included, as in the paper).
        text_embeddings: [N, D] embeddings of the candidate captions.
        reference_embeddings: [N, R, D] embeddings of up to R references per image.
        reference_mask: [N, R] bool, True where a reference exists.

    Returns:
        ``(ref_scores, best_reference_cosine)``, both [N]; the harmonic mean
        is 0 where both terms are 0.
    """
    text = F.normalize(text_embeddings.float(), dim=-1)
    refs = F.normalize(reference_embeddings.float(), dim=-1)
    cosines = torch.einsum("nd,nrd->nr", text, refs).masked_fill(~reference_mask, float("-inf"))
    best = cosines.max(dim=-1).values
    clipped = best.clamp(min=0)
    total = clip_scores + clipped
    harmonic = torch.where(total > 0, 2 * clip_scores * clipped / total.clamp(min=1e-12), torch.zeros_like(total))
    return harmonic, best


def zero_shot_probabilities(
    image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """``softmax(logit_scale * cos(E_v, e_c))`` over classes: [N, C], rows sum to 1."""
    image = F.normalize(image_embeddings.float(), dim=-1)
    classes = F.normalize(class_embeddings.float(), dim=-1)
    return (logit_scale * image @ classes.T).softmax(dim=-1)


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


@dataclass
class ClipScoreOptions:
    prompt: str | None = None
    captions: TextTable | None = None
    sidecar: bool = False
    references: TextTable | None = None
    prefix: str = ""
    weight: float = DEFAULT_WEIGHT
    labels: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    top_k: int = 5
    save_probs: bool = False
    save_embeddings: bool = False
    save_flipped: bool = False  # also the embedding of each image mirrored left-right (select-data's dedup)
    text_batch_size: int = 256


class ClipScoreTask:
    """Per batch: image embeddings, each image's text, scores and labels as rows."""

    name = "clip-score"

    def __init__(self, model: LoadedModel, options: ClipScoreOptions):
        model.require("image_embedding")
        self.has_text = bool(options.prompt is not None or options.captions or options.sidecar)
        if not self.has_text and not options.labels and not options.save_embeddings:
            raise UsageError(
                "clip-score needs texts: --prompt, --captions, --sidecar, --labels for zero-shot, "
                "or --save-embeddings alone"
            )
        if sum([options.prompt is not None, options.captions is not None, options.sidecar]) > 1:
            raise UsageError("choose one caption source: --prompt, --captions or --sidecar")
        if not (math.isfinite(options.weight) and options.weight > 0):
            raise UsageError(f"--weight {options.weight}: give a finite number > 0 (CLIPScore's w is 2.5)")
        if options.references is not None and not self.has_text:
            raise UsageError("--references needs candidate captions (--captions, --sidecar or --prompt)")
        self.model, self.config = model, options
        if (self.has_text or options.labels) and "text_embedding" not in model.capabilities:
            raise UsageError(f"{model.spec} has no text tower: captions and labels need a CLIP model")
        self.text = TextEncoder(model, options.text_batch_size) if (self.has_text or options.labels) else None
        self.embedding_dim = self._embedding_dim()
        self.class_embeddings = self._class_embeddings() if options.labels else None
        logit_scale = getattr(model.module, "logit_scale", None)
        self.logit_scale = float(logit_scale.exp()) if isinstance(logit_scale, torch.Tensor) else 100.0
        self.annotate = read_sidecar_caption if options.sidecar else None
        self._scores: list[float] = []
        self._truncated = 0
        self._encoded_elsewhere = 0  # texts the engine's workers encoded (--engine ray)

    def _embedding_dim(self) -> int:
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *self.model.preprocess.geometry.crop, dtype=torch.uint8)
            return int(self.model.encode_image(self.model.to_input(probe)).shape[-1])

    def _class_embeddings(self) -> torch.Tensor:
        labels, templates = self.config.labels, self.config.templates
        assert labels is not None  # only called with --labels
        texts = [fill_template(template, label) for label in labels for template in templates]
        embeddings = self.text.encode(texts).view(len(labels), len(templates), -1)
        return ensemble_text_embeddings(embeddings)

    # -- Task interface -------------------------------------------------------------

    def fields(self) -> list[pa.Field]:
        fields = []
        if self.has_text:
            fields += [
                pa.field("caption", pa.string()),
                pa.field("clip_score", pa.float32()),
                pa.field("cosine", pa.float32()),
                pa.field("truncated", pa.bool_()),
            ]
        if self.config.references is not None:
            fields += [
                pa.field("ref_clip_score", pa.float32()),
                pa.field("reference_cosine", pa.float32()),
                pa.field("n_references", pa.int32()),
            ]
        if self.config.labels:
            fields += [pa.field("top_labels", pa.list_(pa.string())), pa.field("top_probs", pa.list_(pa.float32()))]
            if self.config.save_probs:
                fields.append(pa.field("probs", pa.list_(pa.float32(), len(self.config.labels))))
        if self.config.save_embeddings:
            # With the base columns' file fingerprint: the layout select-data reads back as its cache.
            d = self.embedding_dim
            fields += [pa.field("image_embedding", pa.list_(pa.float16(), d))]
            if self.config.save_flipped:
                fields.append(pa.field("image_embedding_flipped", pa.list_(pa.float16(), d)))
            if self.has_text:
                fields.append(pa.field("text_embedding", pa.list_(pa.float16(), d)))
        return fields

    def options(self) -> dict:
        o = self.config
        return {
            "text_source": "prompt"
            if o.prompt is not None
            else "captions"
            if o.captions
            else "sidecar"
            if o.sidecar
            else None,
            "prompt": o.prompt,
            "prefix": o.prefix,
            "weight": o.weight,
            "references": o.references is not None,
            "labels": o.labels,
            "templates": o.templates if o.labels else None,
            "top_k": o.top_k,
            "logit_scale": self.logit_scale,
            "save_embeddings": o.save_embeddings,
            "save_mirrored": o.save_flipped,
            "context_length": self.model.context_length,
        }

    def _caption_for(self, record: Record) -> tuple[str | None, str | None]:
        text, error = caption_for(record, self.config.prompt, self.config.captions)
        return (self.config.prefix + text, None) if text is not None else (None, error)

    @torch.inference_mode()
    def map(self, images: torch.Tensor, records: Sequence[Record]) -> MapOutput:
        x = self.model.to_input(images)
        if self.config.save_flipped:
            # The mirrored images in the same forward pass as the originals: one batch of 2B.
            both = self.model.encode_image(torch.cat([x, x.flip(-1)])).float()
            image_embeddings, flipped_embeddings = both[: len(x)], both[len(x) :]
        else:
            image_embeddings = self.model.encode_image(x).float()
        rows: list[dict] = [{} for _ in records]
        if self.has_text:
            self._score_captions(image_embeddings, records, rows)
        if self.class_embeddings is not None:
            probs = zero_shot_probabilities(image_embeddings, self.class_embeddings, self.logit_scale)
            k = min(self.config.top_k, probs.shape[1])
            top_p, top_i = probs.topk(k, dim=-1)
            for row, p, i, full in zip(rows, top_p.cpu().tolist(), top_i.cpu().tolist(), probs.cpu().numpy()):
                row["top_labels"] = [self.config.labels[j] for j in i]
                row["top_probs"] = p
                if self.config.save_probs:
                    row["probs"] = full.tolist()
        if self.config.save_embeddings:
            normalized = F.normalize(image_embeddings, dim=-1).half().cpu().numpy()
            for row, e in zip(rows, normalized):
                row["image_embedding"] = e
            if self.config.save_flipped:
                for row, e in zip(rows, F.normalize(flipped_embeddings, dim=-1).half().cpu().numpy()):
                    row["image_embedding_flipped"] = e
        return MapOutput(rows)

    def _score_captions(self, image_embeddings, records, rows) -> None:
        captions = [self._caption_for(r) for r in records]
        good = [i for i, (text, _) in enumerate(captions) if text is not None]
        for i, (_text, error) in enumerate(captions):
            if error is not None:
                rows[i].update(status="error", error=error)
        if not good:
            return
        texts = [cast(str, captions[i][0]) for i in good]  # good: the captions that are not None
        text_embeddings = self.text.encode(texts)
        scores, cosines = clip_score(image_embeddings[good], text_embeddings, self.config.weight)
        ref_scores = ref_best = None
        n_refs = None
        if self.config.references is not None:
            ref_scores, ref_best, n_refs = self._reference_scores(scores, text_embeddings, [records[i] for i in good])
        text_normalized = (
            F.normalize(text_embeddings, dim=-1).half().cpu().numpy() if self.config.save_embeddings else None
        )
        scores_np, cosines_np = scores.cpu().numpy(), cosines.cpu().numpy()
        for j, i in enumerate(good):
            truncated = self.text.is_truncated(texts[j])
            rows[i].update(
                caption=texts[j], clip_score=float(scores_np[j]), cosine=float(cosines_np[j]), truncated=truncated
            )
            if ref_scores is not None:
                if n_refs[j]:
                    rows[i].update(
                        ref_clip_score=float(ref_scores[j]), reference_cosine=float(ref_best[j]), n_references=n_refs[j]
                    )
                else:
                    rows[i].update(n_references=0)
            if text_normalized is not None:
                rows[i]["text_embedding"] = text_normalized[j]

    def _reference_scores(self, scores, text_embeddings, records):
        references = [self.config.references.texts_for(r.item) or [] for r in records]
        references = [[self.config.prefix + t for t in refs if t.strip()] for refs in references]
        counts = [len(r) for r in references]
        width = max(counts + [1])
        dim = text_embeddings.shape[-1]
        flat = [t for refs in references for t in refs]
        encoded = self.text.encode(flat) if flat else torch.empty(0, dim, device=text_embeddings.device)
        padded = torch.zeros(len(records), width, dim, device=text_embeddings.device)
        mask = torch.zeros(len(records), width, dtype=torch.bool, device=text_embeddings.device)
        offset = 0
        for n, count in enumerate(counts):
            if count:
                padded[n, :count] = encoded[offset : offset + count]
                mask[n, :count] = True
            offset += count
        has_any = mask.any(dim=1)
        mask[~has_any, 0] = True  # keeps max() finite; those rows are reported without a score
        ref_scores, best = ref_clip_score(scores, text_embeddings, padded, mask)
        return ref_scores.cpu().numpy(), best.cpu().numpy(), counts

    summary_columns = ("clip_score", "truncated")

    def observe(self, rows: list[dict]) -> None:
        for row in rows:
            if row.get("clip_score") is not None:
                self._scores.append(row["clip_score"])
                self._truncated += bool(row.get("truncated"))

    def summary(self) -> dict:
        out: dict = {}
        if self.has_text:
            scores = np.asarray(self._scores, dtype=np.float64)
            out["scored"] = int(scores.size)
            if scores.size:
                out.update(
                    clip_score_mean=float(scores.mean()),
                    clip_score_median=float(np.median(scores)),
                    clip_score_p10=float(np.percentile(scores, 10)),
                    clip_score_p90=float(np.percentile(scores, 90)),
                )
            out["truncated_captions"] = self._truncated
        for name, table in (("captions", self.config.captions), ("references", self.config.references)):
            if table is not None:
                out[f"{name}_rows"] = table.rows
                out[f"{name}_without_image"] = len(table.orphans)
                if table.orphans:
                    out[f"{name}_without_image_examples"] = table.orphans[:5]
                if table.duplicates and name == "captions":
                    out[f"{name}_repeated_paths"] = table.duplicates
        if self.text is not None:
            out["texts_encoded"] = self.text.encoded + self._encoded_elsewhere
        return out

    def counters(self) -> dict[str, int]:
        """Work counted inside the task, not in its rows: a worker sends these back (as deltas)."""
        return {"texts_encoded": self.text.encoded if self.text is not None else 0}

    def add_counters(self, delta: dict[str, int]) -> None:
        self._encoded_elsewhere += delta.get("texts_encoded", 0)
