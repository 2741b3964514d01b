"""Texts of images: captions (tables, sidecars), prompt templates and a cached text encoder.

Shared by the tasks that put text beside images: clip-score (captions, references,
zero-shot labels), saliency (a caption or a label as the attribution target) and
select-data (CLIPScore filters). The maths on the embeddings live with the tasks.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from visbatch.core.errors import UsageError
from visbatch.core.images import ImageItem, InputError, Record
from visbatch.core.models import LoadedModel
from visbatch.core.sources import read_sidecar, read_table_file

DEFAULT_TEMPLATE = "a photo of a {}."
TEXT_CACHE_SIZE = 65536


def ensemble_text_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """Class embeddings from several prompt templates, as in CLIP's zero-shot evaluation.

    ``e_c = normalize(mean_t normalize(E(template_t(c))))``

    Reference: Radford et al., "Learning Transferable Visual Models From
    Natural Language Supervision", ICML 2021, sec. 3.1.4 (prompt ensembling).

    Args:
        embeddings: [C, T, D] text embeddings of C classes under T templates.

    Returns:
        [C, D] normalized class embeddings.
    """
    return F.normalize(F.normalize(embeddings.float(), dim=-1).mean(dim=1), dim=-1)


def check_template(template: str) -> None:
    """A prompt template holds exactly one ``{}``, where the label goes."""
    count = template.count("{}")
    if count != 1:
        raise UsageError(f"--template {template!r}: needs exactly one {{}} for the label (has {count})")


def fill_template(template: str, label: str) -> str:
    """The template with its ``{}`` replaced by ``label`` (other braces are kept as typed)."""
    check_template(template)
    return template.replace("{}", label, 1)


def _norm_key(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


@dataclass
class TextTable:
    """Texts per image from a table (captions or references), matched by path.

    A path in the table is absolute, or relative to the input root.
    ``orphans`` are rows whose image file does not exist.
    """

    by_absolute: dict[str, list[str]] = field(default_factory=dict)
    by_relative: dict[str, list[str]] = field(default_factory=dict)
    rows: int = 0
    orphans: list[str] = field(default_factory=list)
    duplicates: int = 0

    @classmethod
    def read(cls, path: str, path_column: str, text_column: str, roots: Sequence[str]) -> TextTable:
        rows = read_table_file(path)
        table = cls(rows=len(rows))
        if rows:
            missing = [c for c in (path_column, text_column) if c not in rows[0]]
            if missing:
                raise InputError(
                    f"{path}: no column {', '.join(map(repr, missing))} "
                    f"(columns: {', '.join(map(str, rows[0]))}); see --path-column/--caption-column"
                )
        for row in rows:
            image_path = row.get(path_column)
            if image_path is None or str(image_path).strip() == "":
                continue
            image_path = str(image_path).strip()
            values = row.get(text_column)
            texts = (
                [str(v) for v in values]
                if isinstance(values, (list, tuple))
                else []
                if values is None
                else [str(values)]
            )
            if os.path.isabs(image_path):
                target = table.by_absolute.setdefault(_norm_key(image_path), [])
                exists = os.path.exists(image_path)
            else:
                target = table.by_relative.setdefault(_norm_key(image_path), [])
                exists = any(os.path.exists(os.path.join(root, image_path)) for root in roots)
            if target:
                table.duplicates += 1
            target.extend(texts)
            if not exists:
                table.orphans.append(image_path)
        return table

    def texts_for(self, item: ImageItem) -> list[str] | None:
        found = self.by_absolute.get(_norm_key(item.path))
        return found if found is not None else self.by_relative.get(_norm_key(item.relpath))


def read_sidecar_caption(item: ImageItem) -> dict:
    """The sample's ``.txt`` or ``.json`` (``caption`` key) sidecar: the img2dataset convention.
    A file beside a local image, a member of the same sample in a tar shard, or a table's
    ``--caption-column``. Runs in the decode workers (the pipeline's ``annotate`` hook).
    """
    name = os.path.splitext(os.path.basename(item.relpath))[0] if item.ref is None else item.relpath
    try:
        text = read_sidecar(item, ".txt")
        if text is not None:
            return {"caption": text.decode("utf-8-sig").strip()}
    except (OSError, UnicodeDecodeError) as exc:
        return {"caption_error": f"cannot read caption file {name}.txt: {exc}"}
    try:
        raw = read_sidecar(item, ".json")
        if raw is None:
            return {}
        data = json.loads(raw.decode("utf-8-sig"))
    except (OSError, ValueError) as exc:
        return {"caption_error": f"cannot read {name}.json: {exc}"}
    caption = data.get("caption") if isinstance(data, dict) else None
    return {"caption": str(caption)} if caption is not None else {}


def caption_for(record: Record, prompt: str | None, captions: TextTable | None) -> tuple[str | None, str | None]:
    """(caption, error) of one image: the prompt, its row in ``captions``, or its sidecar.

    The error says why there is none: no caption row, no sidecar, an
    unreadable sidecar, or an empty caption.
    """
    if prompt is not None:
        text = prompt
    elif captions is not None:
        texts = captions.texts_for(record.item)
        if not texts:
            return None, "no caption"
        text = texts[0]
    else:
        if "caption_error" in record.extra:
            return None, record.extra["caption_error"]
        text = record.extra.get("caption")
        if text is None:
            return None, "no caption (no .txt or .json sidecar)"
    if not text.strip():
        return None, "empty caption"
    return text, None


class TextEncoder:
    """Encodes texts in batches, each unique text once (LRU cache of ``cache_size`` texts)."""

    def __init__(self, model: LoadedModel, batch_size: int = 256, cache_size: int = TEXT_CACHE_SIZE):
        model.require("text_embedding")
        self.model = model
        self.batch_size = batch_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.encoded = 0  # texts run through the text tower (for tests and the summary)
        tokenizer = model.tokenizer
        self._counts_tokens = hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id")

    def token_count(self, text: str) -> int | None:
        """Tokens with start and end markers; None when the tokenizer cannot tell."""
        if not self._counts_tokens:
            return None
        return len(self.model.tokenizer.encode(text)) + 2

    def is_truncated(self, text: str) -> bool | None:
        count = self.token_count(text)
        return None if count is None else count > self.model.context_length

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), D] float32 embeddings (not normalized) on the model's device."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        # Similar lengths in one batch: the text tower runs only up to the longest caption.
        missing.sort(key=len)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            # open_clip's tokenizer truncates to the context length keeping end-of-text last.
            tokens = self.model.tokenize(chunk).to(self.model.device)
            embeddings = self.model.encode_text(tokens).float()
            self.encoded += len(chunk)
            for text, embedding in zip(chunk, embeddings):
                self.cache[text] = embedding
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        result = []
        for text in texts:
            self.cache.move_to_end(text)
            result.append(self.cache[text])
        return torch.stack(result) if result else torch.empty(0)
