"""The runtime layers of a quantized model: the packed weights as buffers, materialized on use.

``speed`` caches the dequantized weight (the model runs as fast as the
original), ``memory`` keeps only the packed integers (and uses the verified
int4 CUDA kernel where it applies, :mod:`.kernels`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from visbatch.core.models import ModelError
from visbatch.core.quantized.kernels import Int4Kernel, int4_kernel_applies, verified_kernel
from visbatch.core.quantized.weights import QuantizedWeight, effective_weight


class QuantizedWeightStore(nn.Module):
    """Holds a packed weight; materializes the effective weight (cached in ``speed`` mode)."""

    def __init__(self, weight: QuantizedWeight, column_scale: torch.Tensor | None, runtime: str = "speed"):
        super().__init__()
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales.half())
        self.register_buffer("zeros", weight.zeros)
        if column_scale is not None:
            self.register_buffer("column_scale", column_scale.float())
        else:
            self.column_scale = None
        self.bits, self.group_size, self.shape = weight.bits, weight.group_size, tuple(weight.shape)
        self.runtime = runtime
        self._cache: torch.Tensor | None = None
        self._kernel: Int4Kernel | bool | None = None  # False once found unusable; memory mode on CUDA only

    def kernel_for(self, x: torch.Tensor):
        """The packed int4 CUDA kernel for a bf16 input in ``memory`` mode, verified on first use;
        None means dequantize-then-matmul (see :mod:`~visbatch.core.quantized.kernels`)."""
        if self.runtime != "memory" or x.dtype != torch.bfloat16 or self._kernel is False:
            return None
        if not int4_kernel_applies(self.bits, self.group_size, self.shape, x.device):
            return None
        if self._kernel is None:
            reference = effective_weight(self._packed(), self.column_scale, torch.float32).to(x.device)
            self._kernel = (
                verified_kernel(
                    lambda: Int4Kernel(
                        self.qweight, self.scales, self.zeros, self.group_size, self.shape, self.column_scale, x.device
                    ),
                    reference,
                    self.shape[1],
                    x.device,
                )
                or False
            )
        return self._kernel or None

    def _packed(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales.float(), self.zeros, self.bits, self.group_size, self.shape)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        if self._cache is not None and self._cache.dtype == dtype and self._cache.device == self.qweight.device:
            return self._cache
        # Built outside inference mode even when called inside it: a weight cached by an
        # inference pass is then also usable by a pass that takes gradients (saliency).
        with torch.inference_mode(False):
            w = effective_weight(self._packed(), self.column_scale, dtype)
        if self.runtime == "speed":
            self._cache = w
        return w


class QuantLinear(nn.Module):
    def __init__(self, store: QuantizedWeightStore, bias: torch.Tensor | None):
        super().__init__()
        self.store = store
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = store.shape

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads ``.weight`` directly (nn.MultiheadAttention's
        out_proj is used that way)."""
        return self.store.materialize(self.bias.dtype if self.bias is not None else torch.float32)

    def forward(self, x):
        kernel = self.store.kernel_for(x)
        if kernel is not None:
            out = kernel(x)
            return out + self.bias.to(out.dtype) if self.bias is not None else out
        return F.linear(x, self.store.materialize(x.dtype), self.bias)


class QuantConv1x1(nn.Module):
    def __init__(self, store: QuantizedWeightStore, bias, stride, padding, dilation):
        super().__init__()
        self.store = store
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.out_channels, self.in_channels = store.shape

    def forward(self, x):
        w = self.store.materialize(x.dtype).view(*self.store.shape, 1, 1)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _install_mha(module: nn.MultiheadAttention, store: QuantizedWeightStore) -> None:
    """Attention keeps its module; its packed in_proj_weight is materialized before each call."""
    del module.in_proj_weight
    module.in_proj_store = store
    cast(Any, module).in_proj_weight = None  # torch types it as a Parameter; None is what MHA itself sets

    def materialize(mod, args, kwargs):
        dtype = args[0].dtype if args else kwargs["query"].dtype
        mod.in_proj_weight = mod.in_proj_store.materialize(dtype)

    module.register_forward_pre_hook(materialize, with_kwargs=True)


def install(model: nn.Module, layers: dict[str, tuple[str, QuantizedWeightStore]]) -> None:
    """Replace each quantized layer (name -> (kind, store)) in ``model``."""
    for name, (kind, store) in layers.items():
        original = model.get_submodule(name)
        if kind == "linear":
            _set_submodule(model, name, QuantLinear(store, cast(torch.Tensor | None, original.bias)))
        elif kind == "conv1x1":
            _set_submodule(
                model, name, QuantConv1x1(store, original.bias, original.stride, original.padding, original.dilation)
            )
        elif kind == "mha_in_proj":
            _install_mha(cast(nn.MultiheadAttention, original), store)
        else:
            raise ModelError(f"unknown quantized layer kind {kind!r}")
