"""Checkpoints: checksums of weight files and modules, safe state-dict loading."""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from visbatch.core.models.loaded import ModelError


def file_checksum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def state_dict_checksum(module: nn.Module) -> str:
    """Checksum of the weights themselves, for models that came from no single file."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "blake2b:" + digest.hexdigest()


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Load weights safely: safetensors, or ``torch.load(weights_only=True)``.

    Never unpickles arbitrary objects. A ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped.
    """
    if not os.path.exists(path):
        raise ModelError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise ModelError(f"checkpoint is a folder, not a file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise ModelError(f"cannot read safetensors checkpoint {path}: {exc}".splitlines()[0])
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot read checkpoint {path} (loaded with weights_only=True): {first}")
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3]) or str(exc)
        raise ModelError(f"checkpoint {source} does not fit the model: {detail[:300]}")
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        detail = f"missing {len(missing)} tensors (e.g. {missing[:2]})" if missing else ""
        if unexpected:
            detail += ("; " if detail else "") + f"unexpected {len(unexpected)} (e.g. {unexpected[:2]})"
        raise ModelError(f"checkpoint {source} does not fit the model: {detail}")
