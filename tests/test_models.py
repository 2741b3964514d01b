"""Model resolution, safe checkpoint loading, preprocessing parity, the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PHOTOS
from visbatch.core.images import decode_image, pil_to_uint8_chw, resize_and_crop
from visbatch.core.models import (
    ModelError,
    UnknownModelError,
    load_model,
    load_state_dict_file,
    resolve_device,
    resolve_precision,
)


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet-lite0", device="cpu")


def _ours(model, path):
    img = decode_image(str(path))
    x = pil_to_uint8_chw(resize_and_crop(img, model.preprocess.geometry))[None]
    return model.to_input(x)


def _unnormalize(x, mean, std):
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def test_preprocessing_matches_open_clip(fixture_images):
    import open_clip

    model = load_model("test-tiny-clip", device="cpu")
    for name, size in [("test-tiny-clip", 64), ("ViT-B-32", 224)]:
        if name == "ViT-B-32":
            # The transform of a real config, without building its 150M weights.
            preprocess = open_clip.image_transform(224, is_train=False)
            model.preprocess = type(model.preprocess)(
                type(model.preprocess.geometry)(resize=224, crop=(224, 224)),
                model.preprocess.mean,
                model.preprocess.std,
            )
        else:
            _, _, preprocess = open_clip.create_model_and_transforms(name)
        for photo in PHOTOS:
            ours = _ours(model, fixture_images / photo)
            theirs = preprocess(decode_image(str(fixture_images / photo)))[None]
            assert ours.shape == theirs.shape == (1, 3, size, size)
            diff = (
                _unnormalize(ours, model.preprocess.mean, model.preprocess.std)
                - _unnormalize(theirs, model.preprocess.mean, model.preprocess.std)
            ).abs()
            # Bit-identical up to float rounding: same resize arithmetic, same uint8 step.
            assert diff.mean().item() < 1e-6 and diff.max().item() < 1e-5


def test_preprocessing_matches_timm(fixture_images, lite0):
    import timm.data

    config = timm.data.resolve_data_config({}, model=lite0.module)
    config.update(mean=lite0.preprocess.mean, std=lite0.preprocess.std)
    transform = timm.data.create_transform(**config)
    for photo in PHOTOS:
        ours = _ours(lite0, fixture_images / photo)
        theirs = transform(decode_image(str(fixture_images / photo)))[None]
        diff = (ours - theirs).abs() * 0.5  # std 0.5: back to [0, 1] pixel units
        assert diff.mean().item() < 1e-6 and diff.max().item() < 1e-5


def test_efficientnet_lite0_recognizes_real_photos(fixture_images, lite0):
    batch = torch.cat([_ours(lite0, fixture_images / p) for p in PHOTOS])
    with torch.inference_mode():
        top1 = lite0.class_logits(batch).argmax(-1).tolist()
    names = [lite0.class_names[i] for i in top1]
    assert 281 <= top1[0] <= 285, names[0]  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert names[1] == "espresso"
    assert names[2] in ("missile", "projectile, missile", "space shuttle")
    assert lite0.checksum.startswith("sha256:") and not lite0.is_random
    assert lite0.encode_image(batch).shape == (4, 1280)


def test_tiny_models_are_seeded_and_marked_random():
    a, b = load_model("test-tiny-clip", device="cpu"), load_model("test-tiny-clip", device="cpu")
    assert a.checksum == b.checksum and a.is_random
    assert a.capabilities == {"image_embedding", "text_embedding"}
    tokens = a.tokenize(["a photo of a cat"])
    assert a.encode_text(tokens).shape == (1, 32)
    vit = load_model("test-tiny-vit-reg", device="cpu")
    assert vit.module.num_prefix_tokens == 5 and "class_logits" in vit.capabilities


def test_unknown_model_names_closest():
    with pytest.raises(UnknownModelError, match="efficientnet-lite0"):
        load_model("efficientnet-lite", device="cpu")
    with pytest.raises(UnknownModelError, match="ViT-B-32"):
        load_model("ViT-B-23", device="cpu")
    with pytest.raises(UnknownModelError, match="timm:resnet50"):
        load_model("timm:resnet5O", device="cpu")


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_model("test-tiny-clip", pretrained=str(tmp_path / "nope.pt"), device="cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_model("timm:resnet10t", pretrained=str(bad), device="cpu")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError, match="safetensors"):
        load_state_dict_file(str(bad_st))


class Payload:
    """An object a malicious checkpoint could carry."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_foreign_checkpoints_load_weights_only(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Payload()}, evil)
    with pytest.raises(ModelError, match="weights_only=True"):
        load_state_dict_file(str(evil))
    # A plain state dict (and a {'state_dict': ...} wrapper) loads.
    tiny = load_model("test-tiny-cnn", device="cpu")
    path = tmp_path / "good.pt"
    torch.save({"state_dict": tiny.module.state_dict()}, path)
    loaded = load_model("timm:resnet10t", pretrained=str(path), device="cpu")
    assert loaded.checksum.startswith("sha256:") and not loaded.is_random


def test_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(ModelError, match="does not fit"):
        load_model("timm:resnet10t", pretrained=str(path), device="cpu")


def test_open_clip_pretrained_tag_needs_network_or_file():
    # The download path is real: with no network it fails with a one-line hint.
    with pytest.raises(ModelError, match="--pretrained PATH|unknown pretrained"):
        load_model("RN50", pretrained="openai", device="cpu")


def test_open_clip_local_weights(tmp_path):
    from safetensors.torch import save_file

    tiny = load_model("test-tiny-clip", device="cpu")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.module.state_dict().items()}, str(path))
    again = load_model("test-tiny-clip", pretrained=str(path), device="cpu")
    assert not again.is_random
    for a, b in zip(tiny.module.parameters(), again.module.parameters()):
        assert torch.equal(a, b)


def test_device_and_precision_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_precision("int3", torch.device("cpu"))
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_bf16_on_cpu_runs(fixture_images):
    model = load_model("test-tiny-vit", device="cpu", precision="bf16")
    x = _ours(model, fixture_images / "chelsea.jpg")
    assert x.dtype == torch.bfloat16
    with torch.inference_mode():
        assert np.isfinite(model.class_logits(x).float().numpy()).all()


@pytest.mark.parametrize(
    "spec, name, kind, prefix",
    [
        ("efficientnet-lite0", "bn2", "conv", 0),
        ("test-tiny-cnn", "layer4", "conv", 0),
        ("test-tiny-vit", "blocks.1", "tokens", 1),
        ("test-tiny-vit-reg", "blocks.1", "tokens", 5),
        ("test-tiny-clip", "transformer.resblocks.1", "tokens", 1),
    ],
)
def test_spatial_layer_found(spec, name, kind, prefix):
    from visbatch.core.models import find_spatial_layer

    model = load_model(spec, device="cpu")
    layer = find_spatial_layer(model)
    assert (layer.name, layer.kind, layer.prefix_tokens) == (name, kind, prefix)


def test_vit_grid_on_non_square_input():
    from visbatch.core.models import find_spatial_layer

    model = load_model("test-tiny-vit-reg", device="cpu")
    layer = find_spatial_layer(model, image_hw=(48, 80))
    assert layer.prefix_tokens == 5 and layer.grid_for((48, 80)) == (3, 5)
    captured = {}
    block = dict(model.module.named_modules())[layer.name]
    handle = block.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.inference_mode():
        model.module(torch.randn(2, 3, 48, 80))
    handle.remove()
    grid = layer.to_map(captured["x"], (48, 80))
    assert grid.shape == (2, 64, 3, 5)
    # Token 5 + r*5 + c (after 1 class + 4 register tokens) lands at row r, column c.
    assert torch.equal(grid[:, :, 1, 2], captured["x"][:, 5 + 1 * 5 + 2, :])


def test_explicit_layer_and_bad_layer():
    from visbatch.core.models import find_spatial_layer

    model = load_model("test-tiny-cnn", device="cpu")
    assert find_spatial_layer(model, layer="layer3").name == "layer3"
    with pytest.raises(ValueError, match="closest"):
        find_spatial_layer(model, layer="layer9")
