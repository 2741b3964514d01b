"""--engine ray: the same rows as --engine local, on one local Ray cluster per module.

The cluster has 2 CPUs (CI's machine) and listens on the loopback interface; actors stay
fewer than cores, as Ray's own test guidance asks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_s3 import s3  # noqa: F401  (a fixture)
from test_sources import TINY_CLIP, TINY_CNN, by_key, pool, same_values  # noqa: F401  (pool is a fixture)

from conftest import VISBATCH, assert_one_line_error, invoke_cli, run_cli, snapshot, write_image

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RAY = ["--engine", "ray", "--batch-size", "3"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Images and the bad files a pool holds: not an image, empty, cut short."""
    root = tmp_path / "corpus"
    for n in range(7):
        write_image(root / f"{n}.jpg", size=(40 + 3 * n, 36), seed=n)
    (root / "sub").mkdir()
    write_image(root / "sub" / "deep.png", seed=9)
    (root / "not-an-image.jpg").write_bytes(b"hello")
    (root / "empty.png").write_bytes(b"")
    cut = (root / "0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(cut[: len(cut) // 3])
    return root


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _same_rows(local: Path, on_ray: Path, columns: list[str]) -> None:
    a, b = _rows(local), _rows(on_ray)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert (x["status"], x["error"]) == (y["status"], y["error"]), x["path"]
        for column in columns:
            u, v = x[column], y[column]
            if isinstance(u, float):
                assert abs(u - v) <= 1e-5, (x["path"], column, u, v)
            elif isinstance(u, list) and u and isinstance(u[0], float):
                assert max(abs(p - q) for p, q in zip(u, v)) <= 1e-5, (x["path"], column)
            else:
                assert u == v, (x["path"], column, u, v)
    meta = json.loads(pq.read_schema(on_ray).metadata[b"visbatch"])
    assert meta["engine"]["engine"] == "ray" and meta["engine"]["cpus"] == 2


def test_a_relative_output_from_another_folder_lands_where_the_driver_runs(cluster, corpus, tmp_path):
    """The cluster runs in the test's folder; the driver in another: every path sent to the
    actors is absolute, so the parts land beside the output, and all rows are there."""
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli(
        "classify", corpus, *TINY_CNN, *RAY, "--ray-address", cluster, "-o", "rel.parquet", "--overlays", "ov",
        "--json", cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = pq.read_table(work / "rel.parquet").to_pylist()
    assert len(table) == 11 and sum(r["status"] == "ok" for r in table) == 8
    assert len(list((work / "ov").rglob("*.png"))) == 8
    assert not Path("rel.parquet.parts").exists() and not Path("ov").exists()


def test_classify_and_saliency_on_ray_equal_local(cluster, corpus, tmp_path):
    before = snapshot(corpus)
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert invoke_cli("classify", corpus, *TINY_CNN, "-o", local).exit_code == 0
    result = invoke_cli("classify", corpus, *TINY_CNN, *RAY, "-o", on_ray)
    assert result.exit_code == 0, result.stderr
    _same_rows(local, on_ray, ["top_indices", "top_probs", "width", "height", "content_hash"])
    assert sum(r["status"] == "error" for r in _rows(on_ray)) == 3
    # saliency (gradient) with overlays: the actors write the same overlay files
    saliency = ["saliency", corpus, *TINY_CNN, "--method", "gradient"]
    overlays_local, overlays_ray = tmp_path / "ov-local", tmp_path / "ov-ray"
    s_local, s_ray = tmp_path / "s-local.parquet", tmp_path / "s-ray.parquet"
    assert invoke_cli(*saliency, "-o", s_local, "--overlays", overlays_local).exit_code == 0
    result = invoke_cli(*saliency, *RAY, "-o", s_ray, "--overlays", overlays_ray, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["overlays_written"] == 8  # the 8 decodable images
    _same_rows(s_local, s_ray, ["target_index", "target_score", "peak_x", "peak_y", "concentration", "map"])
    files = sorted(p.relative_to(overlays_local) for p in overlays_local.rglob("*.png"))
    assert files and files == sorted(p.relative_to(overlays_ray) for p in overlays_ray.rglob("*.png"))
    assert snapshot(corpus) == before


def test_classify_and_clip_score_on_shards_on_ray_equal_local(cluster, pool, tmp_path):  # noqa: F811
    _, shards, _ = pool
    for command, extra, columns in (
        ("classify", TINY_CNN, ["top_indices", "top_probs", "shard", "content_hash"]),
        ("clip-score", [*TINY_CLIP, "--sidecar"], ["clip_score", "cosine", "caption", "shard"]),
    ):
        local, on_ray = tmp_path / f"{command}-local.parquet", tmp_path / f"{command}-ray.parquet"
        assert invoke_cli(command, shards, *extra, "-o", local).exit_code == 0
        result = invoke_cli(command, shards, *extra, *RAY, "-o", on_ray)
        assert result.exit_code == 0, result.stderr
        _same_rows(local, on_ray, columns)
        errors = {k: r["error"] for k, r in by_key(on_ray).items() if r["status"] == "error"}
        assert set(errors) == {"zzbad", "zznoimage"}


def test_a_worker_killed_mid_run_still_gives_one_row_per_input(cluster, corpus, tmp_path):
    """The model actor's process dies on its second batch (once): Ray restarts it and reruns
    the batch, whose part replaces itself; exactly one row per input."""
    from visbatch.core.engines import EngineOptions
    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.sources import find_images

    marker = tmp_path / "died-once"
    model = load_model("test-tiny-cnn", device="cpu")
    task = _dying_classify(model, str(marker))  # a local class: shipped by value
    out = tmp_path / "o.parquet"
    items = find_images([str(corpus)])
    config = RunConfig(output=out, batch_size=3, workers=0, quiet=True, engine=EngineOptions("ray"))
    summary = run_pipeline(task, model, items, config)
    assert marker.exists(), "the actor never died: the test did not test anything"
    rows = _rows(out)
    assert [r["path"] for r in rows] == sorted(it.relpath for it in items)
    assert summary.ok + summary.failed == len(items) == len(rows)


def _dying_classify(model, marker: str):
    """A ClassifyTask whose process exits on its second batch, the first time only."""
    from visbatch.core.tasks.classify import ClassifyTask

    class DyingClassify(ClassifyTask):
        def map(self, images, records):
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches == 2 and not os.path.exists(marker):
                Path(marker).write_text("x")
                os._exit(1)
            return super().map(images, records)

    return DyingClassify(model, top_k=1)


def test_a_killed_driver_resumes_to_exactly_one_row_per_input(cluster, corpus, tmp_path):
    out = tmp_path / "o.parquet"
    args = [*VISBATCH, "classify", str(corpus), *TINY_CNN, "--engine", "ray", "--ray-address", cluster]
    proc = subprocess.Popen([*args, "--batch-size", "1", "-o", str(out)], stderr=subprocess.PIPE, text=True)
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*.arrow"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()
    result = invoke_cli("classify", corpus, *TINY_CNN, *RAY, "-o", out, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed"] >= 1 and summary["resumed"] + summary["processed"] == 11, summary
    assert len(_rows(out)) == 11 and len({r["path"] for r in _rows(out)}) == 11


def test_engine_misuse_is_one_line(corpus, tmp_path, monkeypatch):
    import socket
    import threading

    out = tmp_path / "o.parquet"
    web = socket.socket()  # a service that is not Ray: answers like an HTTP/1 server
    web.bind(("127.0.0.1", 0))
    web.listen(4)

    def answer():
        while True:
            try:
                connection, _ = web.accept()
            except OSError:
                return
            with connection:
                connection.recv(64)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    not_ray = f"127.0.0.1:{web.getsockname()[1]}"
    for args, code, fragment in (
        (["--engine", "spark"], 2, "--engine"),
        (["--engine", "ray", "--concurrency", "3,1"], 2, "--concurrency"),
        (["--engine", "ray", "--ray-address", "127.0.0.1:1"], 3, "cannot reach the Ray cluster"),
        (["--engine", "ray", "--ray-address", not_ray], 3, "not a Ray (gRPC) server"),
    ):
        result = invoke_cli("classify", corpus, *TINY_CNN, *args, "-o", out)
        assert_one_line_error(result, code, fragment)
        assert not out.exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert_one_line_error(invoke_cli("classify", corpus, *TINY_CNN, "--engine", "ray", "-o", out), 2, "visbatch[ray]")
    assert not out.exists() and sys.modules.get("visbatch") is not None
    web.close()


def test_classify_summary_on_ray_equals_local(cluster, corpus, tmp_path):
    """The task's own summary figures (top-1 counts) come back from the actors."""
    local = invoke_cli("classify", corpus, *TINY_CNN, "-o", tmp_path / "l.parquet", "--json")
    on_ray = invoke_cli("classify", corpus, *TINY_CNN, *RAY, "-o", tmp_path / "r.parquet", "--json")
    assert local.exit_code == 0 and on_ray.exit_code == 0, on_ray.stderr
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (local, on_ray))
    assert a["most_common_top1"]  # not empty: the test compares something
    assert a["most_common_top1"] == b["most_common_top1"]
    # clip-score: the scores' figures from the rows, the texts encoded from the actors' counters
    clip = ["clip-score", corpus, *TINY_CLIP, "--prompt", "a photo", "--json"]
    local = invoke_cli(*clip, "-o", tmp_path / "cl.parquet")
    on_ray = invoke_cli(*clip, *RAY, "-o", tmp_path / "cr.parquet")
    assert local.exit_code == 0 and on_ray.exit_code == 0, on_ray.stderr
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (local, on_ray))
    assert a["texts_encoded"] == b["texts_encoded"] == 1 and a["scored"] == b["scored"] == 8
    assert abs(a["clip_score_mean"] - b["clip_score_mean"]) < 1e-5


@pytest.fixture
def labelled_root(tmp_path: Path) -> Path:
    """0_real/: structured noise; 1_fake/: the same images 2x nearest up-sampled (a visible artefact)."""
    from PIL import Image

    root = tmp_path / "labelled"
    for n in range(6):
        real = write_image(root / "0_real" / f"{n}.png", size=(64, 64), seed=n)
        small = Image.open(real).resize((32, 32), Image.BILINEAR)
        (root / "1_fake").mkdir(parents=True, exist_ok=True)
        small.resize((64, 64), Image.NEAREST).save(root / "1_fake" / f"{n}.png")
    return root


def test_pool_jobs_on_ray_equal_local(cluster, labelled_root, corpus, tmp_path):
    """detect-aigi train/eval's feature stage and quantize's calibration decode on the cluster:
    the same features, the same detector figures, the same quantized weights."""
    from safetensors.torch import load_file

    before = snapshot(labelled_root)
    train = ["detect-aigi", "train", labelled_root, "--features", "npr,bitplane", "--size", "64", "--json"]
    reports = {}
    for name, extra in (("local", []), ("ray", RAY)):
        detector = tmp_path / f"{name}.safetensors"
        result = invoke_cli(*train, *extra, "-o", detector)
        assert result.exit_code == 0, result.stderr
        reports[name] = json.loads(result.stdout.strip().splitlines()[-1])
        result = invoke_cli(
            "detect-aigi",
            "eval",
            labelled_root,
            "--detector",
            detector,
            *extra,
            "-o",
            tmp_path / f"e-{name}.parquet",
        )
        assert result.exit_code == 0, result.stderr
    features = {name: _rows(tmp_path / f"{name}.features.parquet") for name in ("local", "ray")}
    assert len(features["local"]) == 12
    for x, y in zip(features["local"], features["ray"]):
        assert x["path"] == y["path"] and max(abs(p - q) for p, q in zip(x["features"], y["features"])) <= 1e-5
    meta = json.loads(pq.read_schema(tmp_path / "ray.features.parquet").metadata[b"visbatch"])
    assert meta["engine"]["engine"] == "ray"
    for key in ("held_out_ap", "held_out_auroc", "threshold"):
        assert abs(reports["local"][key] - reports["ray"][key]) <= 1e-6, key
    a, b = _rows(tmp_path / "e-local.parquet"), _rows(tmp_path / "e-ray.parquet")
    assert [(r["generator"], r["ap"]) for r in a] == [(r["generator"], r["ap"]) for r in b]
    assert snapshot(labelled_root) == before

    good = tmp_path / "calib"
    for n in range(8):
        write_image(good / f"{n}.png", size=(48, 40), seed=20 + n)
    quantize = ["quantize", "--calib", good, "--model", "test-tiny-cnn", "--device", "cpu", "--method", "gptq"]
    for name, extra in (("local", []), ("ray", RAY)):
        result = invoke_cli(*quantize, *extra, "-o", tmp_path / f"q-{name}.safetensors", "--json")
        assert result.exit_code == 0, result.stderr
    qa, qb = load_file(tmp_path / "q-local.safetensors"), load_file(tmp_path / "q-ray.safetensors")
    assert qa.keys() == qb.keys() and all(torch.equal(qa[k], qb[k]) for k in qa)


def test_the_summary_and_metadata_say_which_cluster_ran_the_job(cluster, corpus, tmp_path):
    """``--ray-address auto`` joins whatever cluster runs here: the summary and the output say which."""
    out = tmp_path / "o.parquet"
    result = run_cli("classify", corpus, *TINY_CNN, *RAY, "--ray-address", cluster, "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"engine: Ray cluster at {cluster} (joined): 1 nodes, 2 CPUs" in result.stderr
    meta = json.loads(pq.read_schema(out).metadata[b"visbatch"])
    assert meta["engine"]["address"] == cluster and meta["engine"]["started_here"] is False


def test_workers_get_the_drivers_storage_settings(cluster, s3, tmp_path):  # noqa: F811
    """The cluster was started without the S3 endpoint; the driver has it: the workers read the
    shards through it (the driver's storage variables travel in the job's runtime_env)."""
    assert "FSSPEC_S3_ENDPOINT_URL" not in os.environ
    out = tmp_path / "o.parquet"
    result = run_cli(
        "classify", "s3://pool/shards/{00000..00001}.tar", *TINY_CNN, *RAY, "--ray-address", cluster, "-o", out,
        env=s3["env"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in _rows(out)] == ["ok"] * 4


def test_only_storage_and_visbatch_settings_travel_to_the_workers():
    from visbatch.core.engines.ray_data import forwarded_environment

    env = {"AWS_ACCESS_KEY_ID": "k", "FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:1", "PATH": "/bin", "HOME": "/h"}
    assert forwarded_environment(env | {"VISBATCH_HASH": "sha256", "AWS_PROFILE": ""}) == {
        "AWS_ACCESS_KEY_ID": "k",
        "FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:1",
        "VISBATCH_HASH": "sha256",
    }


def test_a_worker_that_cannot_read_its_first_sample_stops_the_run():
    from visbatch.core.engines.ray_data import DecodeStage
    from visbatch.core.errors import FatalError
    from visbatch.core.images import ImageItem, Record

    def record(error):
        return Record(index=0, item=ImageItem("/r", "a.jpg"), status="error" if error else "ok", error=error)

    stage = DecodeStage(None, None, None, None)
    with pytest.raises(FatalError, match="cannot read its first sample: cannot read image: EndpointConnectionError"):
        stage._check_first_read(record("cannot read image: EndpointConnectionError: Could not connect"))
    stage._check_first_read(record("not an image (cannot identify image file)"))  # the read worked
    stage._check_first_read(record("cannot read image: EndpointConnectionError: later"))  # an error row now


def test_a_join_refused_for_a_missing_token_says_so():
    from visbatch.core.engines.ray_data import join_failure

    logged = [
        b"[2026-12-08 01:01:15,160 W 6989 6989] rpc_client.h:153: Failed to connect to GCS at 10.0.0.5:6379\n",
        b"[2026-12-08 01:01:15,161 E 6989 6989] grpc_client.cc:88: AuthenticationError: Authentication token is"
        b" missing\n",
    ]
    said = join_failure(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"), logged)
    assert said.startswith("grpc_client.cc:88: AuthenticationError: Authentication token is missing")
    assert "RAY_AUTH_TOKEN" in said
    assert join_failure(ConnectionError("Failed to connect"), logged[:1]) == "Failed to connect"
