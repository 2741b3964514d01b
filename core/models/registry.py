"""The model registry and :func:`load_model`, which resolves a spec (see the package docstring).

Two tables are data, so adding an entry is one line:

- :data:`MODEL_REGISTRY`: names visbatch knows (a loader and a description);
- :data:`WEIGHT_FILE_FORMATS`: model files that carry their own architecture
  and weights (``visbatch quantize``'s output registers itself here from
  :mod:`visbatch.core.quantized`), tried in order on a spec that is a file. The
  modules that define formats are listed by name in :data:`WEIGHT_FILE_FORMAT_MODULES`
  and imported when a file is loaded: the formats build on this package, so the
  arrow runs from them to it, never back.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from visbatch.core.errors import UsageError
from visbatch.core.models.devices import resolve_device, resolve_precision
from visbatch.core.models.loaded import LoadedModel, ModelError, UnknownModelError
from visbatch.core.models.loaders import (
    _load_efficientnet_lite0,
    _load_timm,
    _load_tiny_clip,
    _open_clip_model,
    _timm_classifier,
    _tiny_cnn_builder,
    _tiny_vit_builder,
)


@dataclass(frozen=True)
class WeightFileFormat:
    """A model file format: ``claims(path)`` says whether a file is one, ``load(path, device,
    precision, runtime)`` loads it."""

    name: str
    claims: Callable[[str], bool]
    load: Callable[..., LoadedModel]


WEIGHT_FILE_FORMATS: list[WeightFileFormat] = []
WEIGHT_FILE_FORMAT_MODULES = ("visbatch.core.quantized",)  # each registers its formats when imported


def register_weight_file_format(weight_format: WeightFileFormat) -> None:
    if all(f.name != weight_format.name for f in WEIGHT_FILE_FORMATS):
        WEIGHT_FILE_FORMATS.append(weight_format)


@dataclass(frozen=True)
class RegistryEntry:
    loader: Callable[[str | None, torch.device, torch.dtype], LoadedModel]
    description: str


def _tiny_timm_entry(spec: str, builder) -> Callable:
    return lambda pretrained, device, dtype: _timm_classifier(spec, builder, pretrained, device, dtype, is_random=True)


MODEL_REGISTRY: dict[str, RegistryEntry] = {
    "efficientnet-lite0": RegistryEntry(
        _load_efficientnet_lite0,
        "EfficientNet-Lite0 ImageNet classifier, real weights, works offline (75.1% top-1)",
    ),
    "test-tiny-clip": RegistryEntry(
        _load_tiny_clip, "seeded random tiny open_clip ViT (for tests; outputs mean nothing)"
    ),
    "test-tiny-vit": RegistryEntry(
        _tiny_timm_entry("test-tiny-vit", _tiny_vit_builder(reg_tokens=0)),
        "seeded random tiny timm ViT classifier, 10 classes (for tests)",
    ),
    "test-tiny-vit-reg": RegistryEntry(
        _tiny_timm_entry("test-tiny-vit-reg", _tiny_vit_builder(reg_tokens=4)),
        "seeded random tiny timm ViT with 4 register tokens (for tests)",
    ),
    "test-tiny-cnn": RegistryEntry(
        _tiny_timm_entry("test-tiny-cnn", _tiny_cnn_builder()),
        "seeded random timm resnet10t, 10 classes (for tests)",
    ),
}


def known_model_names() -> list[str]:
    """Registry names plus open_clip's architecture names."""
    import open_clip

    return list(MODEL_REGISTRY) + [m for m in open_clip.list_models() if not m.startswith("test-tiny")]


def load_model(
    spec: str,
    pretrained: str | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    runtime: str | None = None,
) -> LoadedModel:
    """Resolve ``spec`` (see module docstring) into a :class:`LoadedModel` (:func:`_load`)."""
    model = _load(spec, pretrained, device, precision, runtime)
    model.runtime = runtime
    return model


def _load(
    spec: str,
    pretrained: str | None,
    device: str | torch.device,
    precision: str,
    runtime: str | None,
) -> LoadedModel:
    """Resolve ``spec`` (see module docstring) into a :class:`LoadedModel`.

    Raises :class:`UnknownModelError` (with the closest valid names) for a spec
    that names nothing, :class:`ModelError` for weights that cannot be loaded,
    and ValueError for bad device or precision values.
    """
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    if spec in MODEL_REGISTRY:
        return MODEL_REGISTRY[spec].loader(pretrained, torch_device, dtype)
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:") :], pretrained, torch_device, dtype)
    if spec.endswith((".safetensors", ".pt", ".pth", ".bin")) and not os.path.exists(spec):
        raise ModelError(f"model file not found: {spec}")
    if os.path.isfile(spec):
        for module in WEIGHT_FILE_FORMAT_MODULES:
            importlib.import_module(module)
        for weight_format in WEIGHT_FILE_FORMATS:
            if weight_format.claims(spec):
                if pretrained:
                    raise UsageError(f"a {weight_format.name} model file carries its own weights; drop --pretrained")
                return weight_format.load(spec, torch_device, precision, runtime)
    import open_clip

    if spec.startswith("hf-hub:") or spec in open_clip.list_models():
        return _open_clip_model(spec, pretrained, torch_device, dtype, spec)
    if os.path.exists(spec):
        raise UnknownModelError(
            f"{spec} is a file; pass a model name with --model and the weights with --pretrained {spec}"
        )
    close = difflib.get_close_matches(spec, known_model_names(), n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise UnknownModelError(
        f"unknown model {spec!r}.{hint} Also: timm:NAME, hf-hub:ORG/NAME; `visbatch info` lists them."
    )
