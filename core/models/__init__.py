"""Models: one place that turns a model spec into a loaded model.

A spec is resolved in :func:`load_model`, in this order:

- a name in :data:`MODEL_REGISTRY` (``efficientnet-lite0``, the seeded
  ``test-tiny-*`` models);
- ``timm:NAME``: a timm classifier, weights from ``--pretrained PATH`` or
  timm's own download;
- an open_clip model name or ``hf-hub:org/name``, with ``--pretrained``
  being an open_clip tag (downloaded by open_clip), a local file, or absent;
- a ``.safetensors`` file written by ``visbatch quantize``.

The result, :class:`LoadedModel`, carries the module on its device and
precision, its preprocessing (:class:`Preprocess`), what it can do
(``image_embedding``, ``text_embedding``, ``class_logits``), its class names
where it has them, and a checksum of the weights for the output's metadata.
Model loading is a plain function of its arguments, so a remote worker (Ray,
a job array) can run it.

Rooms: :mod:`.loaded` (LoadedModel, Preprocess, DeviceOnly, errors),
:mod:`.adapters` (one per family: what differs between open_clip and timm),
:mod:`.loaders` (each family's loader), :mod:`.registry` (names, weight-file
formats, :func:`load_model`), :mod:`.checkpoints`, :mod:`.devices`,
:mod:`.spatial` (where the spatial maps are, for CAMs and heatmaps).
"""

from visbatch.core.models.adapters import ADAPTERS, ModelAdapter, adapter_for
from visbatch.core.models.checkpoints import file_checksum, load_state_dict_file, state_dict_checksum
from visbatch.core.models.devices import PRECISIONS, dtype_name, resolve_device, resolve_precision
from visbatch.core.models.loaded import DeviceOnly, LoadedModel, ModelError, Preprocess, UnknownModelError
from visbatch.core.models.registry import (
    MODEL_REGISTRY,
    WEIGHT_FILE_FORMATS,
    RegistryEntry,
    WeightFileFormat,
    known_model_names,
    load_model,
    register_weight_file_format,
)
from visbatch.core.models.spatial import SpatialLayer, find_spatial_layer

__all__ = [
    "ADAPTERS",
    "MODEL_REGISTRY",
    "PRECISIONS",
    "WEIGHT_FILE_FORMATS",
    "DeviceOnly",
    "LoadedModel",
    "ModelAdapter",
    "ModelError",
    "Preprocess",
    "RegistryEntry",
    "SpatialLayer",
    "UnknownModelError",
    "WeightFileFormat",
    "adapter_for",
    "dtype_name",
    "file_checksum",
    "find_spatial_layer",
    "known_model_names",
    "load_model",
    "load_state_dict_file",
    "register_weight_file_format",
    "resolve_device",
    "resolve_precision",
    "state_dict_checksum",
]
