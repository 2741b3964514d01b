"""Misuse, contract 2: every failure is one line on stderr and a documented exit code.

The reproductions that once gave a traceback, a multi-line box or the wrong
code, each by class; then generated option values for every numeric option,
which must give exit 0 or a one-line error with code 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import VISBATCH, assert_one_line_error, invoke_cli, write_image

TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]


@pytest.fixture
def two(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    write_image(root / "a.jpg", size=(40, 36), seed=1)
    write_image(root / "b.png", size=(36, 40), seed=2)
    return root


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["clip-score", *TINY_CLIP, "IN", "--labels", "a,b", "--template", "{} {}"], 2, "exactly one {}"),
        (["saliency", *TINY_CNN, "IN", "--map-size", "100000"], 2, "--map-size"),
        (["saliency", *TINY_CNN, "IN", "--ig-rule", "foo"], 2, "integration rule"),
        (["saliency", *TINY_CNN, "IN", "--baseline", "foo"], 2, "--baseline"),
        (["saliency", *TINY_CNN, "IN", "--eval-deletion", "foo"], 2, "--eval-deletion"),
        (["classify", *TINY_CNN, "IN", "--limit", "0"], 2, "--limit"),
        (["classify", *TINY_CNN, "IN", "--top-k", "-3"], 2, "--top-k"),
        (["classify", *TINY_CNN, "IN", "--glob", "["], 2, "--glob"),
        (["classify", *TINY_CNN, "IN", "--shard", "3/2"], 2, "--shard"),
        (["classify", "--model", "test-tiny-vit", "--device", "cpu", "IN", "--overlays", "OUT_DIR"], 2, "--overlays"),
        (["select-data", *TINY_CNN, "IN", "--print-selected", "--json"], 2, "choose one"),
        (["classify", "--model", "missing.safetensors", "--device", "cpu", "IN"], 3, "model file not found"),
        (["classify", *TINY_CNN, "IN", "-o", "A_FILE/sub/o.parquet"], 3, "not a folder"),
        (["classify", *TINY_CNN, "IN", "--overlays", "A_FILE/ov"], 3, "not a folder"),
        (["classify", *TINY_CNN, "IN", "--bogus"], 2, "No such option"),
        (["classify", *TINY_CNN, "/no/such/folder"], 2, "input not found"),
        (
            ["detect-aigi", "train", "--real", "IN", "--fake", "IN", "--features", "npr", "--precision", "fp8"]
            + ["-o", "A_FILE.safetensors"],
            2,
            "unknown precision",
        ),
        (["quantize", "--calib", "IN", "--model", "test-tiny-cnn", "-o", "A_FILE/q.safetensors"], 3, "not a folder"),
    ],
)
def test_known_misuse_gives_one_line_and_the_documented_code(two, tmp_path, args, code, fragment):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    replace = {"IN": str(two), "OUT_DIR": str(tmp_path / "ov")}
    argv = []
    for a in args:
        a = replace.get(a, a)
        argv.append(a.replace("A_FILE", str(a_file)))
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "o.parquet")]
    result = invoke_cli(*argv)
    assert_one_line_error(result, code, fragment)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("in", "a_file")]
    assert leftovers == [], f"a refused run created {leftovers}"


def test_bad_environment_values_are_usage_errors(two, tmp_path):
    result = invoke_cli("classify", *TINY_CNN, two, "-o", tmp_path / "o.parquet", env={"VISBATCH_LOG_INTERVAL": "abc"})
    assert_one_line_error(result, 2, "VISBATCH_LOG_INTERVAL")
    result = invoke_cli("classify", *TINY_CNN, two, "-o", tmp_path / "o.parquet", env={"VISBATCH_BATCH_SIZE": "x"})
    assert_one_line_error(result, 2, "VISBATCH_BATCH_SIZE")


def test_a_second_run_on_the_same_output_is_told_who_holds_it(two, tmp_path):
    out = tmp_path / "o.parquet"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom visbatch.core.files import OutputLock\n"
                f"OutputLock({str(out)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = invoke_cli("classify", *TINY_CNN, two, "-o", out, "--resume")
        assert_one_line_error(result, 2, f"in use by pid {holder.pid}")
        assert not out.exists() and not (tmp_path / "o.parquet.parts").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file is stale and does not block.
    assert invoke_cli("classify", *TINY_CNN, two, "-o", out).exit_code == 0
    assert not (tmp_path / "o.parquet.lock").exists()


def test_a_killed_run_whose_forked_workers_live_on_does_not_block_the_next(tmp_path):
    # Decode workers are forked from the run; when the run is SIGKILLed they linger until
    # they notice. The lock must die with the run, not with the last worker.
    out = tmp_path / "o.parquet"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import os, time\nfrom visbatch.core.files import OutputLock\n"
                f"OutputLock({str(out)!r}).acquire()\n"
                "child = os.fork()\n"
                "if child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                "print(child, flush=True)\ntime.sleep(120)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        os.kill(worker, 0)  # the forked worker is still alive, holding the inherited descriptor
        from visbatch.core.files import OutputLock

        with OutputLock(out):
            assert (tmp_path / "o.parquet.lock").exists()
        assert not (tmp_path / "o.parquet.lock").exists()
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_quantize_over_only_broken_files_is_one_line(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.jpg").write_bytes(b"not an image")
    (calib / "b.png").write_bytes(b"")
    result = invoke_cli(
        "quantize",
        "--model",
        "test-tiny-cnn",
        "--calib",
        calib,
        "--method",
        "rtn",
        "--device",
        "cpu",
        "-o",
        tmp_path / "q.safetensors",
    )
    assert_one_line_error(result, 2, "could be decoded")
    assert not (tmp_path / "q.safetensors").exists()


def test_detect_aigi_train_with_one_image_per_class(tmp_path):
    for label in ("0_real", "1_fake"):
        write_image(tmp_path / "root" / label / "x.png", seed=3)
    result = invoke_cli(
        "detect-aigi",
        "train",
        tmp_path / "root",
        "--features",
        "npr",
        "--device",
        "cpu",
        "-o",
        tmp_path / "d.safetensors",
    )
    assert_one_line_error(result, 2, "at least 2 real and 2 fake")


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("q")
    for i in range(3):
        write_image(root / "calib" / f"{i}.jpg", seed=i)
    out = root / "q.safetensors"
    result = invoke_cli(
        "quantize",
        "--model",
        "test-tiny-cnn",
        "--calib",
        root / "calib",
        "--method",
        "rtn",
        "--device",
        "cpu",
        "--bits",
        "8",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    return out


def _damage(source: Path, target: Path, change) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = change(tensors, metadata) or metadata
    save_file(tensors, str(target), metadata=metadata)
    return target


def _first_layer(tensors) -> str:
    return sorted(k for k in tensors if k.endswith(".qweight"))[0][: -len(".qweight")]


def _halve_columns(tensors, metadata):
    name = _first_layer(tensors)
    tensors[name + ".qweight"] = tensors[name + ".qweight"][:, : tensors[name + ".qweight"].shape[1] // 2].clone()


def _say_four_bits(tensors, metadata):
    config = json.loads(metadata["config"])
    config["bits"] = 4
    return {**metadata, "config": json.dumps(config)}


def _nan_scales(tensors, metadata):
    name = _first_layer(tensors)
    tensors[name + ".scales"] = torch.full_like(tensors[name + ".scales"], float("nan"))


@pytest.mark.parametrize(
    "change,fragment",
    [(_halve_columns, "qweight"), (_say_four_bits, "qweight"), (_nan_scales, "scales")],
    ids=["half-columns", "4-bit-metadata-over-int8", "nan-scales"],
)
def test_damaged_quantized_files_are_refused(quantized_file, two, tmp_path, change, fragment):
    damaged = _damage(quantized_file, tmp_path / "damaged.safetensors", change)
    result = invoke_cli(
        "classify", "--model", damaged, "--device", "cpu", "--workers", "0", two, "-o", tmp_path / "o.parquet"
    )
    assert_one_line_error(result, 3, fragment)


def test_typer_errors_and_interrupts_are_one_line_from_the_real_entry_point(two, tmp_path):
    result = subprocess.run(
        [*VISBATCH, "classify", str(two), "--batch-size", "0", "-o", str(tmp_path / "o.parquet")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, 2, "--batch-size")
    assert "╭" not in result.stderr


int_values = st.one_of(
    st.integers(-3, 3), st.integers(10**6, 10**12), st.sampled_from(["nan", "inf", "abc", "1e309", "", "-0"])
)
float_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "abc", "1e309", ""]),
)
OPTIONS = [
    ("classify", "--top-k", int_values),
    ("classify", "--batch-size", int_values),
    ("classify", "--max-pixels", int_values),
    ("classify", "--overlay-size", int_values),
    ("saliency", "--map-size", int_values),
    ("saliency", "--eval-steps", int_values),
    ("saliency", "--sigma", float_values),
    ("saliency", "--alpha", float_values),
    ("saliency", "--samples", int_values),
]


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.sampled_from(range(len(OPTIONS))), data=st.data())
def test_generated_option_values_never_reach_the_user_raw(two, tmp_path, choice, data):
    command, option, values = OPTIONS[choice]
    value = str(data.draw(values))
    extra = (
        ["--method", "smoothgrad", "--samples", "2", "--eval", "--eval-steps", "2"]
        if command == "saliency" and option not in ("--samples", "--eval-steps")
        else []
    )
    if option == "--overlay-size":
        extra = ["--overlays", str(tmp_path / "ov")]
    out = tmp_path / "o.parquet"
    result = invoke_cli(command, *TINY_CNN, two / "a.jpg", "-o", out, "--overwrite", *extra, option, value)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert_one_line_error(result, 2)
    else:
        import math

        import pyarrow.parquet as pq

        for row in pq.read_table(out).to_pylist():
            assert row["status"] in ("ok", "error") and (row["status"] == "ok" or row["error"])
            for key, v in row.items():
                if isinstance(v, float):
                    assert row["status"] != "ok" or math.isfinite(v), (key, v)


def test_json_summaries_are_strict_json(two, tmp_path):
    result = invoke_cli("select-data", *TINY_CNN, two, "-o", tmp_path / "o.parquet", "--budget", "1", "--json")
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    json.loads(result.stdout.strip().splitlines()[-1], parse_constant=refuse)
    assert sys.stdout is not None
