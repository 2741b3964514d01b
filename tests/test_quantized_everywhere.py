"""Every subcommand and every saliency method on every kind of quantized file.

A CNN and a CLIP model, int8 and int4, each under both runtimes (``speed``
caches the dequantized weights, ``memory`` does not): saliency's gradients
must flow through weights that an earlier inference pass cached, and every
row must be ok with finite values.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import invoke_cli, write_image

pytestmark = pytest.mark.slow

CNN_METHODS = [
    ["--method", "gradient"],
    ["--method", "input-x-gradient"],
    ["--method", "smoothgrad", "--samples", "2"],
    ["--method", "integrated-gradients", "--steps", "2"],
    ["--method", "gradcam"],
    ["--method", "gradcam++"],
    ["--method", "rise", "--masks", "8"],
    ["--method", "random"],
]
CLIP_METHODS = CNN_METHODS + [["--method", "attention-relevance"]]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quantized")
    for i in range(4):
        write_image(root / "calib" / f"{i}.jpg", size=(64, 64), seed=i)
        write_image(root / "images" / f"{i}.jpg", size=(56, 48), seed=10 + i)
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n")
    made = {}
    for family, model, extra in (
        ("cnn", "test-tiny-cnn", []),
        ("clip", "test-tiny-clip", ["--towers", "all", "--calib-prompts", str(prompts)]),
    ):
        for bits in (8, 4):
            out = root / f"{family}-int{bits}.safetensors"
            result = invoke_cli(
                "quantize",
                "--model",
                model,
                "--calib",
                root / "calib",
                "--bits",
                bits,
                "--group-size",
                "32",
                "--method",
                "rtn",
                "--device",
                "cpu",
                "-o",
                out,
                *extra,
            )
            assert result.exit_code == 0, result.output
            made[(family, bits)] = out
    return {"root": root, "files": made}


def check_rows(path: Path, expected: int) -> None:
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == expected
    for row in rows:
        assert row["status"] == "ok", row["error"]
        for key, value in row.items():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float):
                    assert math.isfinite(v), (key, v)


@pytest.mark.parametrize("runtime", ["speed", "memory"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", ["cnn", "clip"])
def test_every_subcommand_runs_on_a_quantized_file(files, tmp_path, family, bits, runtime):
    model = files["files"][(family, bits)]
    images = files["root"] / "images"
    common = ["--model", model, "--runtime", runtime, "--device", "cpu", "--workers", "0"]
    runs = []
    if family == "cnn":
        runs.append(["classify", *common, "--overlays", tmp_path / "cams"])
        runs += [["saliency", *common, *method] for method in CNN_METHODS]
    else:
        runs.append(["clip-score", *common, "--labels", "cat,car", "--prompt", "a photo"])
        runs += [["saliency", *common, "--prompt", "a cat", *method] for method in CLIP_METHODS]
    runs.append(["select-data", *common, "--budget", "2"])
    for n, run in enumerate(runs):
        out = tmp_path / f"{n}.parquet"
        # One process, one model load per run: a method runs after the weights were cached by another's pass.
        result = invoke_cli(*run, images, "-o", out)
        assert result.exit_code == 0, (run, result.output)
        check_rows(out, 4)
    detector = tmp_path / "d.safetensors"
    labelled = tmp_path / "labelled"
    for label in ("0_real", "1_fake"):
        for i in range(3):
            write_image(labelled / label / f"{i}.png", size=(64, 64), seed=i + (50 if label == "1_fake" else 0))
    env = {"VISBATCH_RUNTIME": runtime}
    result = invoke_cli(
        "detect-aigi",
        "train",
        labelled,
        "--features",
        "embedding,npr",
        "--model",
        model,
        "--size",
        "32",
        "--device",
        "cpu",
        "-o",
        detector,
        env=env,
    )
    assert result.exit_code == 0, result.output
    result = invoke_cli(
        "detect-aigi",
        "score",
        images,
        "--detector",
        detector,
        "--device",
        "cpu",
        "--workers",
        "0",
        "-o",
        tmp_path / "s.parquet",
        env=env,
    )
    assert result.exit_code == 0, result.output
    check_rows(tmp_path / "s.parquet", 4)
