"""What a loaded model is: :class:`LoadedModel` (module, preprocessing, abilities, adapter),
:class:`Preprocess`, :class:`DeviceOnly` (a device without weights) and the model errors.

Family-specific behaviour (how to get an image embedding, patch tokens, the
text tower, ...) lives in the family's adapter (:mod:`.adapters`), looked up
by ``LoadedModel.family``; nothing here branches on the family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.images import Geometry
from visbatch.core.models.adapters import ModelAdapter, adapter_for, pooled_layers
from visbatch.core.models.devices import resolve_device, resolve_precision


class ModelError(FatalError):
    """The model could not be loaded (missing or corrupt checkpoint): exit code 3."""


class UnknownModelError(UsageError):
    """The spec names no model visbatch knows: a usage error, exit code 2."""


@dataclass(frozen=True)
class Preprocess:
    """The model's eval preprocessing: CPU geometry, then device normalization."""

    geometry: Geometry
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {**self.geometry.as_dict(), "mean": list(self.mean), "std": list(self.std)}


class DeviceOnly:
    """Where a task that needs no network runs (pixel-statistics features): a device and a
    precision, no weights. The pipeline takes it in place of a :class:`LoadedModel`."""

    def __init__(self, device: str | torch.device = "auto", precision: str = "fp32"):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.spec, self.is_random, self.preprocess, self.checksum = "none", False, None, None

    def describe(self) -> dict:
        return {"spec": None, "note": "no model: pixel statistics only"}


@dataclass
class LoadedModel:
    """A model ready to run: module on device, preprocessing, abilities."""

    spec: str
    pretrained: str | None
    family: str  # a key of adapters.ADAPTERS: "open_clip" | "timm"
    module: nn.Module
    preprocess: Preprocess
    device: torch.device
    dtype: torch.dtype
    capabilities: frozenset[str]
    checksum: str
    class_names: list[str] | None = None
    tokenizer: Callable | None = None
    context_length: int | None = None
    is_random: bool = False  # seeded test models: outputs mean nothing
    channels_last: bool = False  # set by _finish for convolutional models
    _trim_text: bool | None = None  # decided on first use by _padding_trim_is_exact
    notes: list[str] = field(default_factory=list)
    runtime: str | None = None  # --runtime it was loaded with (quantized files), for a cluster's workers

    # -- device-side preprocessing -------------------------------------------------

    def to_input(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] (any device) -> normalized input on the model's device and dtype."""
        x = images_uint8.to(self.device, non_blocking=True)
        mean = torch.tensor(self.preprocess.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x.float().div_(255.0) - mean) / std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    # -- what the model can do -------------------------------------------------------

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise ModelError(
                f"model {self.spec!r} has no {capability.replace('_', ' ')} "
                f"(it has: {', '.join(sorted(self.capabilities))})"
            )

    @property
    def adapter(self) -> ModelAdapter:
        """The family's adapter (:mod:`.adapters`): what differs between open_clip and timm."""
        return adapter_for(self.family)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalized). For classifiers: the penultimate features."""
        self.require("image_embedding")
        return self.adapter.encode_image(self.module, x)

    @property
    def has_patch_tokens(self) -> bool:
        """Whether :meth:`encode_patches` works: a ViT pooled by its class token."""
        return self.adapter.has_patch_tokens(self.module)

    def encode_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-token embeddings [B, grid_h, grid_w, D] in the space of :meth:`encode_image`, for
        ViTs whose image embedding is their class token passed through the final norm (and, in
        open_clip, the projection): each patch token goes through the same norm and projection.
        ModelError for other models (CNNs, attention- or average-pooled ViTs)."""
        self.require("image_embedding")
        if not self.has_patch_tokens:
            raise ModelError(f"{self.spec} is not a class-token ViT: no patch-token embeddings")
        tokens, patch = self.adapter.patch_tokens(self.module, x)
        grid_h, grid_w = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
        if grid_h * grid_w != tokens.shape[1]:
            raise ModelError(f"{self.spec}: {tokens.shape[1]} patch tokens do not form a {grid_h}x{grid_w} grid")
        return tokens.reshape(x.shape[0], grid_h, grid_w, -1)

    def encode_layers(self, x: torch.Tensor) -> torch.Tensor:
        """[B, sum of widths]: the output of each block (ViTs) or stage (CNNs) of the image tower,
        mean-pooled over space (a ViT's patch tokens) and L2-normalized, then the L2-normalized
        image embedding, from one forward pass."""
        self.require("image_embedding")
        found = self.adapter.intermediates(self.module, x)
        if found is None:
            raise ModelError(f"{self.spec}: its image tower does not expose intermediate features")
        return pooled_layers(*found)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings (not normalized) of token ids [B, context_length]."""
        self.require("text_embedding")
        return self.adapter.encode_text(self, tokens.to(self.device))

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.require("class_logits")
        return self.module(x)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        self.require("text_embedding")
        return cast(Callable, self.tokenizer)(list(texts))  # set for models with text_embedding

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "pretrained": self.pretrained,
            "family": self.family,
            "checksum": self.checksum,
            "capabilities": sorted(self.capabilities),
            "random_weights": self.is_random,
        }
