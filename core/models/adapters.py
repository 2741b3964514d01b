"""One adapter per model family: everything that differs between open_clip and timm models.

A :class:`~visbatch.core.models.loaded.LoadedModel` names its family; ``model.adapter`` is the family's
adapter, and the rest of visbatch asks it instead of branching on the family
(the way timm gives every model one interface). A quantized file
(:mod:`visbatch.core.quantized`) wraps a model of one of these families and
uses its adapter unchanged. Adding a family is one adapter class here, its
loader in :mod:`.loaders` and a line in :data:`ADAPTERS`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from visbatch.core.errors import UsageError


class TextModel(Protocol):
    """What an adapter's text encoding needs of a loaded model (TextModel is one): the adapters
    name this interface rather than TextModel, which looks its adapter up here."""

    module: nn.Module
    device: torch.device
    dtype: torch.dtype
    _trim_text: bool | None

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...


class ModelAdapter:
    """The interface; the defaults are a plain image classifier's."""

    family = ""
    # Default select-data near-duplicate threshold for this family's embeddings (see README).
    default_dedup_threshold = 0.85
    # Tower prefixes of quantizable layers per --towers choice (an empty prefix: the whole module).
    tower_prefixes: dict[str, list[str]] = {"visual": [""], "all": [""]}
    # Tensors quantize keeps in full precision per tower and lists in its report (embeddings, projections).
    kept_embeddings: dict[str, list[str]] = {}

    def image_tower(self, module: nn.Module) -> nn.Module:
        """The module that maps images to features (CAM layer search, block chains)."""
        return module

    def forward_image(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The main forward on images: class logits for a classifier, the image embedding for CLIP."""
        return module(x)

    def encode_image(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def has_patch_tokens(self, module: nn.Module) -> bool:
        return False

    def patch_tokens(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """([B, T, D] patch tokens in the image embedding's space, patch size)."""
        raise NotImplementedError

    def intermediates(self, module: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(each block's or stage's output maps [B, C, H, W], the final embedding), or None."""
        return None

    def tower_of(self, layer_name: str) -> str:
        """``visual`` or ``text``: the tower a layer belongs to."""
        return "visual"

    def quantization_prefixes(self, spec: str, towers: str) -> list[str]:
        if towers not in self.tower_prefixes:
            raise UsageError(f"{spec} has no {towers} tower")
        return self.tower_prefixes[towers]

    def encode_text(self, model: TextModel, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimmAdapter(ModelAdapter):
    family = "timm"

    def encode_image(self, module, x):
        return module.forward_head(module.forward_features(x), pre_logits=True)

    def has_patch_tokens(self, module):
        return getattr(module, "global_pool", None) == "token" and hasattr(module, "patch_embed")

    def patch_tokens(self, module, x):
        tokens = module.forward_features(x)[:, module.num_prefix_tokens :]
        return module.fc_norm(tokens), tuple(module.patch_embed.patch_size)

    def intermediates(self, module, x):
        if not hasattr(module, "forward_intermediates"):
            return None
        last, maps = module.forward_intermediates(x)
        return maps, module.forward_head(last, pre_logits=True)


class OpenClipAdapter(ModelAdapter):
    family = "open_clip"
    default_dedup_threshold = 0.95  # SemDeDup's, for CLIP embeddings
    tower_prefixes = {"visual": ["visual."], "text": ["transformer."], "all": ["visual.", "transformer."]}
    kept_embeddings = {
        "visual": ["visual.conv1", "visual.positional_embedding", "visual.proj"],
        "text": ["token_embedding", "positional_embedding", "text_projection"],
    }

    def image_tower(self, module):
        return module.visual

    def forward_image(self, module, x):
        return module.encode_image(x)

    def encode_image(self, module, x):
        return module.encode_image(x)

    def has_patch_tokens(self, module):
        visual = module.visual
        return (
            getattr(visual, "pool_type", None) == "tok"
            and getattr(visual, "attn_pool", None) is None
            and hasattr(visual, "output_tokens")
            and hasattr(visual, "conv1")
        )

    def patch_tokens(self, module, x):
        visual = module.visual
        visual.output_tokens = True
        try:
            _, tokens = visual(x)
        finally:
            visual.output_tokens = False
        if getattr(visual, "final_ln_after_pool", False):
            tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return tokens, tuple(visual.conv1.kernel_size)

    def intermediates(self, module, x):
        visual = module.visual
        if not hasattr(visual, "forward_intermediates"):
            return None
        out = visual.forward_intermediates(x)
        return out["image_intermediates"], out["image_features"]

    def tower_of(self, layer_name):
        return "visual" if layer_name == "visual" or layer_name.startswith("visual.") else "text"

    def encode_text(self, model, tokens):
        if model._trim_text is None:
            model._trim_text = _padding_trim_is_exact(model)
        if model._trim_text:
            return _encode_text_trimmed(model.module, tokens)
        return model.module.encode_text(tokens)


ADAPTERS: dict[str, ModelAdapter] = {adapter.family: adapter for adapter in (TimmAdapter(), OpenClipAdapter())}


def adapter_for(family: str) -> ModelAdapter:
    try:
        return ADAPTERS[family]
    except KeyError:
        raise ValueError(f"no model adapter for family {family!r} (known: {', '.join(ADAPTERS)})") from None


def pooled_layers(maps: list[torch.Tensor], final: torch.Tensor) -> torch.Tensor:
    """Each map mean-pooled over space and L2-normalized, then the L2-normalized final embedding."""
    pooled = [F.normalize(m.float().mean(dim=(2, 3)), dim=-1) for m in maps]
    return torch.cat(pooled + [F.normalize(final.float(), dim=-1)], dim=1)


def _encode_text_trimmed(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` run only up to the batch's last non-padding token.

    CLIP's text tower is causal and pools at the end-of-text token, so the
    padding after it changes nothing that is pooled; captions are mostly far
    shorter than the 77-token context, and skipping the padding makes the
    text tower several times cheaper. :func:`_padding_trim_is_exact` checks
    the equality on the loaded model before this path is used.
    """
    length = int((tokens != 0).sum(dim=1).max().item()) if tokens.numel() else tokens.shape[1]
    length = max(1, min(length, tokens.shape[1]))
    text = tokens[:, :length]
    cast_dtype = module.transformer.get_cast_dtype()
    x = module.token_embedding(text).to(cast_dtype)
    x = x + module.positional_embedding[:length].to(cast_dtype)
    x = module.transformer(x, attn_mask=module.attn_mask[:length, :length])
    x = module.ln_final(x)
    from open_clip.transformer import text_global_pool

    x = text_global_pool(x, text, module.text_pool_type, eos_token_id=getattr(module, "text_eos_id", None))
    if module.text_projection is not None:
        x = module.text_projection(x) if isinstance(module.text_projection, nn.Linear) else x @ module.text_projection
    return x


def _padding_trim_is_exact(model: TextModel) -> bool:
    """Whether :func:`_encode_text_trimmed` gives the model's own result (checked on a probe)."""
    module = model.module
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_pool_type")
    if not all(hasattr(module, n) for n in needed):
        return False
    if module.text_pool_type not in ("argmax", "eos") or module.attn_mask is None:
        return False
    try:
        probe = model.tokenize(["a photo of a cat", "two dogs playing in the snow near a red house"])
        with torch.inference_mode():
            full = module.encode_text(probe.to(model.device)).float()
            trimmed = _encode_text_trimmed(module, probe.to(model.device)).float()
    except Exception:
        return False
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(full, trimmed, atol=tolerance * full.abs().max().item(), rtol=0))
