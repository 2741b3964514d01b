"""Attention probabilities that stay in the autograd graph, for attention relevance.

open_clip 3.x runs attention through ``nn.MultiheadAttention`` (fused, no
weights returned) and timm through ``F.scaled_dot_product_attention``, so the
attention matrix never exists as a tensor. :class:`AttentionRecorder` puts a
forward hook on each attention module that recomputes the module's output
explicitly from its input (projections, softmax, weighted sum, output
projection) and *returns* it, so the rest of the network runs on the
recomputed output and the recorded probabilities receive gradients. No
library file or class is patched; the hooks are removed on exit. On the first
call of each module the recomputed output is checked against the module's
own; a mismatch raises rather than explaining a different network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visbatch.core.errors import UsageError


def attention_modules(tower: nn.Module) -> list[nn.Module]:
    """Self-attention modules of a vision tower, in definition order (= execution order for ViTs)."""
    found: list[nn.Module] = []
    for module in tower.modules():
        if isinstance(module, nn.MultiheadAttention):
            found.append(module)
        elif hasattr(module, "qkv") and hasattr(module, "num_heads") and hasattr(module, "proj"):
            found.append(module)
    return found


def _mha_recompute(module: nn.MultiheadAttention, args, kwargs):
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    if key is not query:
        raise UsageError("attention relevance supports self-attention only")
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    x = query if module.batch_first else query.transpose(0, 1)
    batch, tokens, width = x.shape
    heads = module.num_heads
    head_dim = width // heads
    if module.in_proj_weight is None:
        raise UsageError("attention relevance needs a packed in_proj_weight")
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
    if mask is not None:
        logits = logits + (
            mask
            if mask.dtype != torch.bool
            else torch.zeros_like(mask, dtype=logits.dtype).masked_fill(mask, float("-inf"))
        )
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
    out = module.out_proj(out)
    if not module.batch_first:
        out = out.transpose(0, 1)
    return probs, out


def _timm_recompute(module: nn.Module, args, kwargs):
    x = args[0] if args else kwargs["x"]
    if kwargs.get("attn_mask") is not None or getattr(module, "gate", None) is not None:
        raise UsageError("attention relevance does not support masked or gated timm attention")
    batch, tokens, _ = x.shape
    heads, head_dim = module.num_heads, module.head_dim
    qkv = module.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    probs = ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    out = module.norm(out) if hasattr(module, "norm") else out
    return probs, module.proj(out)


class AttentionRecorder:
    """Context manager: records each attention module's probabilities [B, heads, T, T] with gradients."""

    def __init__(self, modules: list[nn.Module]):
        if not modules:
            raise UsageError("the model has no attention modules (attention relevance needs a ViT)")
        self.modules = modules
        self.probabilities: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._checked: set[int] = set()

    def _hook(self, module, args, kwargs, output):
        if isinstance(module, nn.MultiheadAttention):
            probs, out = _mha_recompute(module, args, kwargs)
            own = output[0] if isinstance(output, tuple) else output
        else:
            probs, out = _timm_recompute(module, args, kwargs)
            own = output
        if id(module) not in self._checked:
            scale = own.detach().abs().max().clamp(min=1e-6)
            if (out.detach() - own.detach()).abs().max() > 1e-2 * scale:
                raise UsageError(
                    f"cannot reproduce {type(module).__name__}'s output; attention relevance "
                    "does not support this attention variant"
                )
            self._checked.add(id(module))
        if probs.requires_grad:
            probs.retain_grad()
        self.probabilities.append(probs)
        return (out, None) if isinstance(output, tuple) else out

    def __enter__(self):
        self.probabilities = []
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False
