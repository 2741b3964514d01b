"""The engine's contracts, through the CLI as a user calls it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import VISBATCH, run_cli, summary_json, write_image
from visbatch.cli.main import app
from visbatch.core.outputs import parts_dir_for, read_run_metadata

runner = CliRunner()
TINY = ["--model", "test-tiny-cnn", "--device", "cpu"]


def invoke(*args, input=None, env=None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def classify(*args, **kw):
    return invoke("classify", *TINY, "--workers", "0", *args, **kw)


def rows(path):
    return pq.read_table(path).to_pylist()


def add_bad_files(folder: Path) -> None:
    (folder / "zz_empty.jpg").write_bytes(b"")
    (folder / "sub" / "not_image.png").write_text("hello")
    good = (folder / "img_00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])


def test_one_row_per_input_in_sorted_order_with_errors(image_folder, tmp_path):
    add_bad_files(image_folder)
    out = tmp_path / "out.parquet"
    result = classify(image_folder, "-o", out, "--batch-size", "3", "--json")
    assert result.exit_code == 0, result.output
    table = rows(out)
    paths = [r["path"] for r in table]
    assert paths == sorted(paths) and len(paths) == 13
    by_path = {r["path"]: r for r in table}
    assert by_path["zz_empty.jpg"]["status"] == "error"
    assert by_path["zz_empty.jpg"]["error"] == "empty file (0 bytes)"
    assert "not an image" in by_path["sub/not_image.png"]["error"]
    assert "truncated" in by_path["truncated.jpg"]["error"]
    ok = [r for r in table if r["status"] == "ok"]
    assert len(ok) == 10 and all(len(r["top_labels"]) == 5 and r["width"] for r in ok)
    assert all(r["top_labels"] is None for r in table if r["status"] == "error")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["failed"], summary["inputs"]) == (10, 3, 13)
    assert "zz_empty.jpg: empty file (0 bytes)" in summary["error_examples"]


def test_fail_on_error_exit_code(image_folder, tmp_path):
    add_bad_files(image_folder)
    result = classify(image_folder, "-o", tmp_path / "o.parquet", "--fail-on-error")
    assert result.exit_code == 1
    assert (tmp_path / "o.parquet").exists(), "results are still written"


@pytest.mark.slow
def test_same_results_for_any_workers_and_batch_size(image_folder, tmp_path):
    outs = []
    for workers, batch in [(0, 1), (2, 4), (3, 32)]:
        out = tmp_path / f"w{workers}_b{batch}.parquet"
        result = invoke("classify", *TINY, image_folder, "-o", out, "--workers", workers, "--batch-size", batch)
        assert result.exit_code == 0, result.output
        outs.append(rows(out))
    for other in outs[1:]:
        assert [r["path"] for r in other] == [r["path"] for r in outs[0]]
        for a, b in zip(outs[0], other):
            assert a["top_indices"] == b["top_indices"]
            assert a["top_probs"] == pytest.approx(b["top_probs"], abs=1e-5)


def test_metadata_and_atomic_output(image_folder, tmp_path):
    out = tmp_path / "res" / "out.parquet"
    assert classify(image_folder, "-o", out).exit_code == 0
    meta = read_run_metadata(out)
    for key in [
        "visbatch_version",
        "command_line",
        "model",
        "preprocessing",
        "device",
        "precision",
        "started_at",
        "finished_at",
        "roots",
        "task_options",
    ]:
        assert key in meta, key
    assert meta["model"]["spec"] == "test-tiny-cnn" and meta["model"]["checksum"]
    assert meta["roots"] == [str(image_folder.resolve())]
    assert meta["rows"] == 10 and meta["precision"] == "fp32"
    assert sorted(os.listdir(out.parent)) == ["out.parquet"], "no temp files or parts left"


def test_overwrite_guard(image_folder, tmp_path):
    out = tmp_path / "out.parquet"
    assert classify(image_folder, "-o", out).exit_code == 0
    before = out.read_bytes()
    again = classify(image_folder, "-o", out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert out.read_bytes() == before
    assert classify(image_folder, "-o", out, "--overwrite", "--limit", "2").exit_code == 0
    assert len(rows(out)) == 2


def test_resume_adds_only_missing_images(image_folder, tmp_path):
    out = tmp_path / "out.parquet"
    assert classify(image_folder, "-o", out, "--limit", "4").exit_code == 0
    first = {r["path"]: r for r in rows(out)}
    result = classify(image_folder, "-o", out, "--resume", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == 4 and summary["processed"] == 6
    table = rows(out)
    assert len(table) == 10 and len({r["path"] for r in table}) == 10
    assert all(table_row == first[table_row["path"]] for table_row in table if table_row["path"] in first)


def test_resume_refuses_a_different_job(image_folder, tmp_path):
    out = tmp_path / "out.parquet"
    assert classify(image_folder, "-o", out, "--limit", "2").exit_code == 0
    other = invoke("classify", "--model", "test-tiny-vit", "--device", "cpu", image_folder, "-o", out, "--resume")
    assert other.exit_code == 2 and "model: test-tiny-cnn -> test-tiny-vit" in other.stderr


def _wait_for_parts(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    parts = parts_dir_for(out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if parts.exists() and len(list(parts.glob("part-*.arrow"))) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError("no parts appeared")


@pytest.fixture
def many_images(tmp_path):
    root = tmp_path / "many"
    for i in range(240):
        write_image(root / f"d{i % 3}" / f"im{i:03d}.png", size=(24, 24), seed=i)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_exactly_one_row_per_image(many_images, tmp_path, sig):
    out = tmp_path / "out.parquet"
    args = [*VISBATCH, "classify", *TINY, str(many_images), "-o", str(out), "--batch-size", "2", "--workers", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_parts(out, 3, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, proc.stderr.read()
        assert "--resume" in proc.stderr.read()
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run leaves no half-written output"
    done_before = len(pq.ParquetDataset if False else list(parts_dir_for(out).glob("part-*.arrow")))
    assert done_before >= 3
    again = run_cli("classify", *TINY, many_images, "-o", out, "--batch-size", "8", "--resume", "--json")
    assert again.returncode == 0, again.stderr
    summary = summary_json(again)
    assert summary["resumed"] >= 6 and summary["resumed"] + summary["processed"] == 240
    table = rows(out)
    paths = [r["path"] for r in table]
    assert len(paths) == 240 and len(set(paths)) == 240 and paths == sorted(paths)
    assert all(r["status"] == "ok" for r in table)
    assert not parts_dir_for(out).exists()


@pytest.mark.slow
def test_interrupted_run_needs_resume_or_overwrite(many_images, tmp_path):
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen(
        [*VISBATCH, "classify", *TINY, str(many_images), "-o", str(out), "--batch-size", "2", "--workers", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_parts(out, 1, proc)
    proc.kill()
    proc.wait()
    result = classify(many_images, "-o", out)
    assert result.exit_code == 2 and "--resume" in result.stderr


def test_stdin_and_manifest_inputs(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(image_folder)
    out = tmp_path / "stdin.parquet"
    result = classify("-", "-o", out, input="img_01.jpg\nsub/pic_0.png\n")
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in rows(out)] == ["img_01.jpg", "sub/pic_0.png"]
    manifest = image_folder / "list.csv"
    manifest.write_text("path\nimg_03.jpg\nsub/deep/last.webp\nmissing.jpg\n")
    out2 = tmp_path / "manifest.parquet"
    assert classify("--manifest", manifest, "-o", out2).exit_code == 0
    table = rows(out2)
    assert [r["path"] for r in table] == ["img_03.jpg", "missing.jpg", "sub/deep/last.webp"]
    assert table[1]["status"] == "error" and "cannot read file" in table[1]["error"]


def test_multiple_roots_get_a_root_column(image_folder, tmp_path):
    other = tmp_path / "other"
    write_image(other / "img_00.jpg", seed=5)
    out = tmp_path / "out.parquet"
    assert classify(image_folder, other, "-o", out).exit_code == 0
    table = rows(out)
    assert len(table) == 11
    assert {r["root"] for r in table} == {str(image_folder), str(other)}
    assert sum(r["path"] == "img_00.jpg" for r in table) == 2


def test_bomb_guard_from_cli(image_folder, tmp_path):
    out = tmp_path / "o.parquet"
    assert classify(image_folder, "-o", out, "--max-pixels", "2000").exit_code == 0
    errors = [r for r in rows(out) if r["status"] == "error"]
    assert errors and all("too large" in r["error"] for r in errors)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["/no/such/folder"], 2, "input not found"),
        ([], 2, "no input"),
        (["EMPTY"], 2, "no images found"),
        (["IMAGES", "--model", "efficientnet-lite"], 2, "efficientnet-lite0"),
        (["IMAGES", "--shard", "5/2"], 2, "--shard"),
        (["IMAGES", "--colormap", "rainbow"], 2, "--colormap"),
        (["IMAGES", "--device", "quantum"], 2, "device"),
        (["IMAGES", "--model", "timm:resnet10t", "--pretrained", "CORRUPT"], 3, "cannot read checkpoint"),
        (["IMAGES", "--model", "timm:resnet10t", "--pretrained", "/no/weights.pt"], 3, "checkpoint not found"),
        (["IMAGES", "--batch-size", "0"], 2, "batch-size"),
    ],
)
def test_exit_codes_and_one_line_errors(image_folder, tmp_path, args, code, message):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    mapping = {"IMAGES": str(image_folder), "EMPTY": str(tmp_path / "empty"), "CORRUPT": str(corrupt)}
    args = [mapping.get(a, a) for a in args]
    if "--model" not in args:
        args = TINY + args
    result = runner.invoke(app, ["classify", "--workers", "0", "-o", str(tmp_path / "o.parquet"), *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_env_vars_set_options(image_folder, tmp_path):
    out = tmp_path / "o.parquet"
    result = invoke(
        "classify",
        image_folder,
        env={
            "VISBATCH_MODEL": "test-tiny-cnn",
            "VISBATCH_LIMIT": "3",
            "VISBATCH_OUTPUT": str(out),
            "VISBATCH_WORKERS": "0",
        },
    )
    assert result.exit_code == 0, result.output
    assert len(rows(out)) == 3 and read_run_metadata(out)["model"]["spec"] == "test-tiny-cnn"


@pytest.mark.slow
def test_console_script_version_info_and_json(image_folder, tmp_path):
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("visbatch ")
    info = run_cli("info", "--json")
    assert info.returncode == 0 and "efficientnet-lite0" in json.loads(info.stdout)["models"]
    out = tmp_path / "o.parquet"
    result = run_cli("classify", *TINY, image_folder, "-o", out, "--json", "--quiet")
    assert result.returncode == 0 and result.stderr == ""
    assert summary_json(result)["ok"] == 10
    # Not a terminal: periodic log lines instead of a progress bar.
    logged = run_cli("classify", *TINY, image_folder, "-o", tmp_path / "p.parquet", env={"VISBATCH_LOG_INTERVAL": "0"})
    assert "img/s" in logged.stderr and "\r" not in logged.stderr


def test_classify_overlays_mirror_folders(image_folder, tmp_path):
    out = tmp_path / "o.parquet"
    overlays = tmp_path / "ov"
    result = classify(image_folder, "-o", out, "--overlays", overlays, "--overlay-size", "32")
    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(overlays)) for p in overlays.rglob("*.png"))
    assert written == sorted(r["path"] + ".png" for r in rows(out)), "overlays keep the source extension"
    from PIL import Image

    assert max(Image.open(overlays / "sub" / "deep" / "last.webp.png").size) == 32


class RankTask:
    """A map stage that scores images and a reduce stage that ranks them over the whole run."""

    name = "rank-test"

    def fields(self):
        import pyarrow as pa

        return [pa.field("brightness", pa.float32()), pa.field("rank", pa.int32())]

    def options(self):
        return {}

    def map(self, images, records):
        from visbatch.core.pipeline import MapOutput

        return MapOutput([{"brightness": float(img.float().mean())} for img in images])

    def reduce(self, table):
        import numpy as np
        import pyarrow as pa

        values = np.nan_to_num(table.column("brightness").to_numpy(zero_copy_only=False).astype(float), nan=-1)
        ranks = np.empty(len(values), dtype=np.int32)
        ranks[np.argsort(-values, kind="stable")] = np.arange(len(values), dtype=np.int32)
        return table.set_column(table.schema.get_field_index("rank"), "rank", pa.array(ranks))

    def summary(self):
        return {}


def test_reduce_stage_sees_every_row_including_resumed(image_folder, tmp_path):
    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.sources import find_images

    model = load_model("test-tiny-cnn", device="cpu")
    items = find_images([str(image_folder)])
    out = tmp_path / "r.parquet"
    run_pipeline(RankTask(), model, items[:4], RunConfig(output=str(out), workers=0, quiet=True))
    run_pipeline(RankTask(), model, items, RunConfig(output=str(out), workers=0, quiet=True, resume=True))
    table = rows(out)
    assert sorted(r["rank"] for r in table) == list(range(10))
    by_rank = sorted(table, key=lambda r: r["rank"])
    assert all(a["brightness"] >= b["brightness"] for a, b in zip(by_rank, by_rank[1:]))


@pytest.mark.slow
def test_shard_outputs_merge_back_to_the_whole_run(image_folder, tmp_path):
    whole = tmp_path / "whole.parquet"
    assert classify(image_folder, "-o", whole).exit_code == 0
    parts = []
    for i in range(3):
        part = tmp_path / f"part-{i}.parquet"
        assert classify(image_folder, "--shard", f"{i}/3", "-o", part).exit_code == 0
        parts.append(str(part))
    merged = tmp_path / "merged.parquet"
    result = invoke("merge", *parts, "-o", merged)
    assert result.exit_code == 0
    drop = ("top_probs",)
    a = [{k: v for k, v in r.items() if k not in drop} for r in rows(whole)]
    b = [{k: v for k, v in r.items() if k not in drop} for r in rows(merged)]
    assert a == b
    assert read_run_metadata(merged)["merged_from"] == [os.path.abspath(p) for p in parts]
    again = runner.invoke(app, ["merge", parts[0], parts[0], "-o", str(tmp_path / "dup.parquet")])
    assert again.exit_code == 2 and "shard 0/3 is given twice" in again.stderr
    other = tmp_path / "other.parquet"
    invoke("classify", "--model", "test-tiny-vit", "--device", "cpu", "--workers", "0", image_folder, "-o", other)
    mixed = runner.invoke(app, ["merge", parts[0], str(other), "-o", str(tmp_path / "mixed.parquet")])
    assert mixed.exit_code == 2 and "other weights" in mixed.stderr
