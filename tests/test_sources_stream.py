"""Shard pools listed as the run goes: chunks, --limit, resume, and the same rows as a full listing."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_sources import TINY_CNN, add_member, jpeg_bytes

from conftest import invoke_cli
from visbatch.core.sources import SourceOptions, find_image_stream, find_images, stream
from visbatch.core.sources import shards as shard_module


@pytest.fixture
def many_shards(tmp_path: Path) -> Path:
    """8 shards of 5 samples (one of them damaged), keys rising with the shard number."""
    folder = tmp_path / "shards"
    folder.mkdir()
    images = [jpeg_bytes(seed) for seed in range(5)]
    for shard in range(8):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for k in range(5):
                add_member(tar, f"{shard:05d}{k:04d}.jpg", images[k] if (shard, k) != (3, 2) else b"broken")
                add_member(tar, f"{shard:05d}{k:04d}.txt", f"caption {shard} {k}".encode())
    return folder


@pytest.fixture
def listed_shards(monkeypatch):
    """The names of the shards the stream has listed so far, in order."""
    names: list[str] = []
    real = shard_module.list_shard

    def counting(root, name, warnings=None, kept=()):
        names.append(name)
        return real(root, name, warnings, kept)

    monkeypatch.setattr(stream, "list_shard", counting)
    return names


def keys(items) -> list[str]:
    return [it.relpath for it in items]


def test_stream_gives_the_full_listing_in_chunks(many_shards, listed_shards, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_SIZE", 12)
    everything = keys(find_images([str(many_shards)]))
    items = find_image_stream([str(many_shards)])
    assert items.roots == [str(many_shards)] and len(items.locations) == 8
    assert listed_shards == []  # nothing is read before the run asks
    chunks = [keys(chunk) for chunk in items.chunks()]
    assert [len(c) for c in chunks] == [15, 15, 10]  # whole shards, at least 12 items a chunk
    assert [k for c in chunks for k in c] == everything
    assert all(c == sorted(c) for c in chunks)


def test_limit_glob_and_shard_on_a_stream(many_shards, listed_shards, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_SIZE", 5)
    limited = find_image_stream([str(many_shards)], SourceOptions(limit=7))
    assert keys(limited) == keys(find_images([str(many_shards)]))[:7]
    assert len(listed_shards) <= 3, listed_shards  # the rest of the pool was never read
    globbed = keys(find_image_stream([str(many_shards)], SourceOptions(globs=["*0001"])))
    assert globbed == [f"{s:05d}.tar/{s:05d}0001" for s in range(8)]
    parts = [keys(find_image_stream([str(many_shards)], SourceOptions(shard=(i, 3)))) for i in range(3)]
    assert sorted(k for part in parts for k in part) == keys(find_images([str(many_shards)]))
    nothing = find_image_stream([str(many_shards)], SourceOptions(globs=["nomatch*"]))
    assert nothing.is_empty()


def test_first_rows_come_before_the_pool_is_listed(many_shards, listed_shards, monkeypatch, tmp_path):
    """The first batch reaches the model while most shards are still unread."""
    monkeypatch.setattr(stream, "CHUNK_SIZE", 5)
    from visbatch.core.models import load_model
    from visbatch.core.pipeline import RunConfig, run_pipeline
    from visbatch.core.tasks.classify import ClassifyTask

    model = load_model("test-tiny-cnn", device="cpu")
    task = ClassifyTask(model, top_k=1)
    seen_at_first_batch: list[int] = []
    real_map = task.map

    def map_(images, records):
        if not seen_at_first_batch:
            seen_at_first_batch.append(len(listed_shards))
        return real_map(images, records)

    task.map = map_
    out = tmp_path / "o.parquet"
    items = find_image_stream([str(many_shards)])
    summary = run_pipeline(task, model, items, RunConfig(output=out, batch_size=4, workers=0, quiet=True))
    assert seen_at_first_batch[0] <= 2, seen_at_first_batch  # the chunk in hand and one listed ahead
    assert summary.inputs == 40 and summary.ok == 39 and summary.failed == 1
    rows = pq.read_table(out).to_pylist()
    assert [r["path"] for r in rows] == keys(find_images([str(many_shards)]))


def test_streamed_cli_run_equals_the_full_listing_and_resumes(many_shards, monkeypatch, tmp_path):
    listed = tmp_path / "listed.parquet"
    assert invoke_cli("classify", many_shards, *TINY_CNN, "-o", listed).exit_code == 0  # one chunk
    monkeypatch.setattr(stream, "CHUNK_SIZE", 6)
    streamed = tmp_path / "streamed.parquet"
    assert invoke_cli("classify", many_shards, *TINY_CNN, "-o", streamed).exit_code == 0
    a, b = pq.read_table(listed).to_pylist(), pq.read_table(streamed).to_pylist()
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert (x["status"], x["top_labels"], x["shard"], x["content_hash"]) == (
            y["status"],
            y["top_labels"],
            y["shard"],
            y["content_hash"],
        )
        assert (x["top_probs"] is None) == (y["top_probs"] is None)
        if x["top_probs"] is not None:
            assert x["top_probs"] == pytest.approx(y["top_probs"], abs=1e-6)
    # A shard gone and one added: resume drops the gone shard's rows and does only the new one.
    (many_shards / "00007.tar").unlink()
    with tarfile.open(many_shards / "00009.tar", "w") as tar:
        add_member(tar, "000090000.jpg", jpeg_bytes(9))
    result = invoke_cli("classify", many_shards, *TINY_CNN, "-o", streamed, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["resumed"], summary["removed"], summary["processed"]) == (35, 5, 1), summary
    paths = [r["path"] for r in pq.read_table(streamed).to_pylist()]
    assert len(paths) == 36 and "00009.tar/000090000" in paths and not any(p.startswith("00007") for p in paths)


@pytest.mark.parametrize("multi_root", [False, True])
def test_merge_by_copy_equals_merge_by_sort(tmp_path, multi_root):
    """Parts in key order are copied part by part; out of order (or repeating a key) they are
    sorted in memory: the same table and metadata either way, in row groups."""
    import pyarrow as pa

    from visbatch.core.outputs import ROW_GROUP_SIZE, ResultsWriter, read_run_metadata

    fields = [pa.field("value", pa.float32())]
    count = ROW_GROUP_SIZE + 300

    def row(n: int) -> dict:
        out = {"path": f"{n:06d}.tar/{n:09d}", "status": "ok", "value": float(n), "path_bytes": None}
        if multi_root:
            out["root"] = "/a" if n < count // 2 else "/b"
        return out

    batches = [[row(n) for n in range(start, min(start + 100, count))] for start in range(0, count, 100)]
    tables = {}
    for order in ("rising", "shuffled", "repeated"):
        out = tmp_path / f"{order}.parquet"
        writer = ResultsWriter(out, fields, {"task": "t"}, multi_root=multi_root)
        todo = batches if order != "shuffled" else batches[::-1]
        for batch in todo:
            writer.write_rows(batch)
        if order == "repeated":
            writer.write_rows([{**row(5), "value": 5.0}])  # a redone row: the newest wins
        assert writer.finalize() == count
        writer.close()
        tables[order] = pq.read_table(out)
        assert read_run_metadata(out)["rows"] == count
        assert pq.ParquetFile(out).metadata.num_row_groups == 2
    assert tables["rising"].equals(tables["shuffled"]) and tables["rising"].equals(tables["repeated"])
    assert tables["rising"].column("value").to_pylist() == [float(n) for n in range(count)]
