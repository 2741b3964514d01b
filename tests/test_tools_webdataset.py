"""visbatch beside the ``webdataset`` library: shards its ShardWriter/TarWriter write are read
as it reads them (and, for dotted keys, as they were written), and the shards
``select-data --write-shards`` writes are read back by ``webdataset`` and by ``datasets``."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE_IMAGES, PHOTOS, assert_one_line_error, invoke_cli
from visbatch.core.sources import find_images, read_item, read_sidecar

wds = pytest.importorskip("webdataset")
TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]


def photo(n: int) -> bytes:
    """A distinct JPEG per ``n``: a fixture photo, cropped at an offset of its own."""
    from PIL import Image

    with Image.open(FIXTURE_IMAGES / PHOTOS[n % len(PHOTOS)]) as image:
        side = min(image.size) // 2
        offset = 9 * (n // len(PHOTOS))
        crop = image.convert("RGB").crop((offset, offset, offset + side, offset + side)).resize((96, 96))
    buffer = io.BytesIO()
    crop.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def mask_png(n: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), n * 20).save(buffer, "PNG")
    return buffer.getvalue()


def npy_bytes(n: int) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.arange(4, dtype=np.int32) + n)
    return buffer.getvalue()


def write_with_shardwriter(folder: Path, samples: list[dict], maxcount: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "pool-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return sorted(folder.glob("*.tar"))


def read_with_webdataset(shards: list[Path]) -> list[dict]:
    dataset = wds.WebDataset([str(s) for s in shards], shardshuffle=False)
    return [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]} for s in dataset]


def dotted_samples(n: int = 20) -> list[dict]:
    return [
        {
            "__key__": f"a.b.c{i:03d}",
            "jpg": photo(i),
            "txt": f"photo number {i}",
            "json": {"url": f"http://example.org/{i}.jpg", "uid": f"u{i:04d}", "orig_width": 100 + i},
        }
        for i in range(n)
    ]


def test_dotted_keys_read_as_shardwriter_wrote_them(tmp_path):
    samples = dotted_samples()
    shards = write_with_shardwriter(tmp_path / "pool", samples)
    items = find_images([str(tmp_path / "pool")])
    assert [it.ref.key for it in items] == [s["__key__"] for s in samples]
    assert [read_sidecar(it, ".txt").decode() for it in items] == [s["txt"] for s in samples]
    assert [read_item(it).data for it in items] == [s["jpg"] for s in samples]
    # The stated difference: webdataset itself cuts at the first dot and reads one sample "a"
    # per shard, every member a field of it.
    theirs = read_with_webdataset(shards)
    assert [s["__key__"] for s in theirs] == ["a"] * len(shards)

    out = tmp_path / "out.parquet"
    result = invoke_cli("classify", tmp_path / "pool", *TINY_CNN, "--keep-columns", "url,uid,orig_width", "-o", out)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 20
    assert [r["key"] for r in rows] == [s["__key__"] for s in samples]
    assert [r["uid"] for r in rows] == [s["json"]["uid"] for s in samples]
    assert [r["url"] for r in rows] == [s["json"]["url"] for s in samples]
    assert [r["orig_width"] for r in rows] == [str(s["json"]["orig_width"]) for s in samples]  # .json fields as text

    scored = tmp_path / "clip.parquet"
    result = invoke_cli("clip-score", tmp_path / "pool", *TINY_CLIP, "--sidecar", "-o", scored)
    assert result.exit_code == 0, result.output
    assert [r["caption"] for r in pq.read_table(scored).to_pylist()] == [s["txt"] for s in samples]


def test_plain_keys_group_exactly_as_webdataset(tmp_path):
    samples = []
    for i in range(10):
        sample = {"__key__": f"{i:09d}", "jpg": photo(i), "txt": f"caption {i}", "cls": str(i % 3).encode()}
        if i % 2:
            sample["seg.png"] = mask_png(i)
            sample["npy"] = npy_bytes(i)
        samples.append(sample)
    shards = write_with_shardwriter(tmp_path / "pool", samples, maxcount=4)
    theirs = read_with_webdataset(shards)
    ours = find_images([str(tmp_path / "pool")])
    assert [it.ref.key for it in ours] == [s["__key__"] for s in theirs]
    assert [sorted(e.lower() for e in it.ref.extensions) for it in ours] == [
        sorted(k for k in s if k != "__key__") for s in theirs
    ]
    for item, sample in zip(ours, theirs):
        assert dict(item.ref.member_bytes()) == {k: v for k, v in sample.items() if k != "__key__"}


def test_write_shards_keeps_every_member_and_key_for_webdataset_and_datasets(tmp_path):
    long_key = "k" * 300  # over ustar's 100 characters: a PAX header, as TarWriter writes
    samples = []
    for i in range(6):
        samples.append(
            {
                "__key__": long_key if i == 5 else f"part/{i:06d}",
                "jpg": photo(i),
                "txt": f"caption {i}",
                "json": {"uid": f"u{i}"},
                "cls": str(i).encode(),
                "seg.png": mask_png(i),
                "npy": npy_bytes(i),
            }
        )
    write_with_shardwriter(tmp_path / "pool", samples, maxcount=3)
    out = tmp_path / "selected"
    options = ["--no-dedup", "--budget", "4", "--write-shards", out, "--shard-size", "2"]
    result = invoke_cli("select-data", tmp_path / "pool", *TINY_CLIP, *options, "-o", tmp_path / "manifest.parquet")
    assert result.exit_code == 0, result.output
    manifest = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    chosen = {r["key"] for r in manifest if r["selected"]}
    assert len(chosen) == 4 and {r["written_key"] for r in manifest if r["selected"]} == chosen
    written = sorted(out.glob("*.tar"))
    assert [p.name for p in written] == ["000000.tar", "000001.tar"]
    by_key = {s["__key__"]: s for s in samples}

    def expected(key: str) -> dict:
        sample = by_key[key]
        encoded = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in sample.items() if k != "__key__"}
        return {k: v.encode() if isinstance(v, str) else v for k, v in encoded.items()}

    theirs = read_with_webdataset(written)
    assert {s["__key__"] for s in theirs} == chosen
    for sample in theirs:
        fields = {k: v for k, v in sample.items() if k != "__key__"}
        original = expected(sample["__key__"])
        assert set(fields) == set(original)
        assert all(fields[k] == original[k] for k in original if k != "json")
        assert json.loads(fields["json"]) == json.loads(original["json"])

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "webdataset",
        data_files={"train": [str(p) for p in written]},
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert sorted(loaded["__key__"]) == sorted(chosen)
    assert {"jpg", "txt", "cls", "npy"} <= set(loaded.column_names)
    assert sorted(loaded["txt"]) == sorted(by_key[k]["txt"] for k in chosen)


def test_a_300_character_key_from_a_loose_image_is_written(tmp_path):
    folder = tmp_path / "photos"
    (folder / ("d" * 120)).mkdir(parents=True)
    long_name = folder / ("d" * 120) / (("p" * 180) + ".jpg")
    shutil.copy(FIXTURE_IMAGES / PHOTOS[0], long_name)
    shutil.copy(FIXTURE_IMAGES / PHOTOS[1], folder / "short.jpg")
    out = tmp_path / "selected"
    options = ["--no-dedup", "--budget", "2", "--write-shards", out]
    result = invoke_cli("select-data", folder, *TINY_CLIP, *options, "-o", tmp_path / "m.parquet")
    assert result.exit_code == 0, result.output
    keys = [s["__key__"] for s in read_with_webdataset(sorted(out.glob("*.tar")))]
    assert sorted(keys) == sorted([f"{'d' * 120}/{'p' * 180}", "short"])


def test_gzipped_shards_give_the_rows_of_plain_ones(tmp_path):
    samples = [{"__key__": f"{i:06d}", "jpg": photo(i), "txt": f"c{i}"} for i in range(6)]
    shards = write_with_shardwriter(tmp_path / "plain", samples, maxcount=3)
    (tmp_path / "gz").mkdir()
    for shard in shards:
        with gzip.open(tmp_path / "gz" / (shard.name + ".gz"), "wb") as f:
            f.write(shard.read_bytes())
    plain, zipped = tmp_path / "plain.parquet", tmp_path / "gz.parquet"
    assert invoke_cli("classify", tmp_path / "plain", *TINY_CNN, "-o", plain).exit_code == 0
    result = invoke_cli("classify", tmp_path / "gz", *TINY_CNN, "-o", zipped)
    assert result.exit_code == 0, result.output
    drop = ("path", "shard", "file_mtime")
    mine = [{k: v for k, v in r.items() if k not in drop} for r in pq.read_table(plain).to_pylist()]
    theirs = [{k: v for k, v in r.items() if k not in drop} for r in pq.read_table(zipped).to_pylist()]
    assert mine == theirs and all(r["status"] == "ok" for r in mine)
    # a gzipped shard cut short: the samples before the cut keep their rows, then one error row
    data = (tmp_path / "gz" / (shards[0].name + ".gz")).read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "000000.tar.gz").write_bytes(data[: len(data) // 2])
    result = invoke_cli("classify", tmp_path / "cut" / "000000.tar.gz", *TINY_CNN, "-o", tmp_path / "cut.parquet")
    assert result.exit_code in (0, 1), result.output
    errors = [r["error"] for r in pq.read_table(tmp_path / "cut.parquet").to_pylist() if r["status"] == "error"]
    assert errors and "gzip" in errors[-1]


def test_pipe_urls_are_refused_in_one_line(tmp_path):
    result = invoke_cli("classify", "pipe:curl -s http://127.0.0.1:9/x.tar", *TINY_CNN, "-o", tmp_path / "o.parquet")
    assert_one_line_error(result, 2, "pipe: inputs")
    assert not os.path.exists(tmp_path / "o.parquet")


def test_keep_columns_key_clashes_with_the_key_column(tmp_path):
    write_with_shardwriter(tmp_path / "pool", dotted_samples(2))
    result = invoke_cli("classify", tmp_path / "pool", *TINY_CNN, "--keep-columns", "key", "-o", tmp_path / "o")
    assert_one_line_error(result, 2, "--keep-columns 'key'")


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_dotted_keys_with_long_extensions_and_nested_stems(tmp_path):
    """``a.b.seg.png`` belongs to key ``a.b`` (its stem extends the key), whichever member comes first."""
    (tmp_path / "s.tar").write_bytes(
        _tar_bytes({"a.b.seg.png": b"1", "a.b.txt": b"t1", "a.c.jpg": photo(0), "a.c.seg.png": b"2", "a.c.txt": b"t2"})
    )
    items = find_images([str(tmp_path / "s.tar")])
    assert [(it.ref.key, it.ref.extensions) for it in items] == [
        ("a.b", ("seg.png", "txt")),
        ("a.c", ("jpg", "seg.png", "txt")),
    ]


def test_what_a_new_user_found(tmp_path):
    """A lone dotted sample keeps its key and sidecars; a mask is not the image when the sample
    has one; pipe: in a shard list is refused; --hash and --keep-columns misuse is one line."""
    (tmp_path / "s.tar").write_bytes(
        _tar_bytes(
            {
                "a.b.c000.jpg": photo(0),
                "a.b.c000.txt": b"lone dotted",
                "a.b.c000.json": b'{"url": "u1"}',
                "plain1.jpg": photo(1),
                "p5.seg.png": mask_png(3),
                "p5.jpg": photo(2),
            }
        )
    )
    items = {it.ref.key: it for it in find_images([str(tmp_path / "s.tar")])}
    assert sorted(items) == ["a.b.c000", "p5", "plain1"]
    assert read_sidecar(items["a.b.c000"], ".txt") == b"lone dotted"
    assert read_item(items["p5"]).data == photo(2)
    out = tmp_path / "o.parquet"
    result = invoke_cli("classify", tmp_path / "s.tar", *TINY_CNN, "--keep-columns", "url", "-o", out)
    assert result.exit_code == 0, result.output
    assert {r["key"]: r["url"] for r in pq.read_table(out).to_pylist()}["a.b.c000"] == "u1"
    (tmp_path / "list.txt").write_text(f"{tmp_path / 's.tar'}\npipe:cat {tmp_path / 's.tar'}\n")
    assert_one_line_error(invoke_cli("classify", tmp_path / "list.txt", *TINY_CNN, "-o", tmp_path / "p"), 2, "pipe:")
    for extra, fragment in (
        (["--hash", "md5"], "--hash must be one of blake2b, sha256"),
        (["--keep-columns", "shard"], "--keep-columns 'shard'"),
    ):
        result = invoke_cli("classify", tmp_path / "s.tar", *TINY_CNN, *extra, "-o", tmp_path / "q.parquet")
        assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "p").exists() and not (tmp_path / "q.parquet").exists()
