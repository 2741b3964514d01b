"""Where a model's spatial feature maps are (for CAM methods and patch heatmaps)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from visbatch.core.errors import UsageError
from visbatch.core.models.loaded import LoadedModel


@dataclass(frozen=True)
class SpatialLayer:
    """A layer whose activations form a spatial map.

    ``kind`` is ``conv`` (activations [B, C, H, W], taken at the module's
    output) or ``tokens`` (activations [B, T, C] at the module's *input*:
    for ViTs the token grid before the last block). ``prefix_tokens`` counts
    the class and register tokens in front of the patch grid.
    """

    name: str
    kind: str
    patch_size: tuple[int, int] | None = None
    prefix_tokens: int = 0

    def grid_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (rows, columns) for an input of ``image_hw`` pixels."""
        if self.patch_size is None:
            raise ValueError(f"layer {self.name} has no patch size")
        return image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1]

    def to_map(self, activations: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Activations as [B, C, h, w], class and register tokens dropped."""
        if self.kind == "conv":
            return activations
        rows, cols = self.grid_for(image_hw)
        tokens = activations[:, self.prefix_tokens :, :]
        if tokens.shape[1] != rows * cols:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not form a {rows}x{cols} grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)


def _patch_size(tower: nn.Module) -> tuple[int, int] | None:
    """The stride of the first convolution whose stride equals its kernel (the patch embedding)."""
    for module in tower.modules():
        if isinstance(module, nn.Conv2d) and module.stride == module.kernel_size and module.stride[0] > 1:
            return (module.stride[0], module.stride[1])
    return None


def _transformer_blocks(tower: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ViT's residual blocks, in order: the children of the longest ModuleList of blocks."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in tower.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > len(best):
            children = list(module.named_children())
            if children and all(
                any(isinstance(m, nn.MultiheadAttention) or "attn" in n.lower() for n, m in child.named_modules())
                for _, child in children
            ):
                best = [(f"{name}.{child_name}" if name else child_name, child) for child_name, child in children]
    return best


def find_spatial_layer(
    model: LoadedModel, layer: str | None = None, image_hw: tuple[int, int] | None = None
) -> SpatialLayer:
    """Find where the model's spatial maps are, by running one probe image.

    CNNs: the last module whose output is a 4-D map larger than 1x1 (the
    last conv stage, before global pooling). ViTs: the input of the last
    transformer block, with the grid inferred from the patch size and the
    token count (class and register tokens are the extra tokens in front).
    ``layer`` names a module explicitly (``--layer``).
    """
    tower = model.adapter.image_tower(model.module)
    image_hw = image_hw or model.preprocess.geometry.crop
    modules = dict(tower.named_modules())
    if layer is not None and layer not in modules:
        close = difflib.get_close_matches(layer, list(modules), n=5, cutoff=0.4)
        raise UsageError(f"no layer {layer!r} in {model.spec}" + (f"; closest: {', '.join(close)}" if close else ""))
    blocks = _transformer_blocks(tower)
    block_names = {name for name, _ in blocks}
    shapes: dict[str, tuple] = {}
    order: list[str] = []
    handles = []
    for name, module in tower.named_modules():
        if not name:
            continue

        def hook(mod, args, output, name=name):
            if name in block_names or name == layer:
                source = args[0] if args and isinstance(args[0], torch.Tensor) else output
                shapes[name + "#input"] = tuple(source.shape)
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)
                order.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        probe = torch.zeros(1, 3, *image_hw, device=model.device, dtype=model.dtype)
        with torch.inference_mode():
            model.adapter.forward_image(model.module, probe)
    finally:
        for handle in handles:
            handle.remove()

    patch = _patch_size(tower)
    if layer is not None:
        shape = shapes.get(layer)
        if shape is not None and len(shape) == 4:
            return SpatialLayer(layer, "conv")
        token_shape = shapes.get(layer + "#input", shape)
        if token_shape is not None and len(token_shape) == 3 and patch is not None:
            return _token_layer(layer, token_shape, patch, image_hw)
        raise UsageError(f"layer {layer!r} of {model.spec} gives no spatial map (output shape {shape})")
    if blocks and patch is not None:
        last = blocks[-1][0]
        return _token_layer(last, shapes[last + "#input"], patch, image_hw)
    for name in reversed(order):
        shape = shapes[name]
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            return SpatialLayer(name, "conv")
    raise UsageError(f"{model.spec}: found no spatial feature maps")


def _token_layer(name: str, shape: tuple, patch: tuple[int, int], image_hw: tuple[int, int]) -> SpatialLayer:
    # open_clip before 3.x ran transformers sequence-first: [T, B, C].
    tokens = shape[1] if shape[0] == 1 else shape[0] if shape[1] == 1 else shape[1]
    grid = (image_hw[0] // patch[0]) * (image_hw[1] // patch[1])
    prefix = tokens - grid
    if prefix < 0:
        raise UsageError(f"{name}: {tokens} tokens are fewer than the {grid} patches of the input")
    return SpatialLayer(name, "tokens", patch_size=patch, prefix_tokens=prefix)
