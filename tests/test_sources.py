"""Input sources: WebDataset tar shards, Parquet/Arrow image tables, URLs (fsspec), shard output.

The contract: every source gives the same rows as the same images in a folder (same values
per key), damage is an error row or one line, resume skips what is done, no input changes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE_IMAGES, PHOTOS, assert_one_line_error, invoke_cli, snapshot, write_image
from visbatch.core.sources import InputError, SourceOptions, find_images, read_item, read_sidecar
from visbatch.core.sources.shards import expand_braces, iter_members

CPU = ["--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", *CPU]
TINY_CNN = ["--model", "test-tiny-cnn", *CPU]


# ----------------------------------------------------------------------------
# Building shards and tables the way img2dataset and HF datasets do
# ----------------------------------------------------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int = 1_700_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(seed: int, size=(56, 44)) -> bytes:
    path = write_image(Path(f"/tmp/visbatch-test-{os.getpid()}-{seed}.jpg"), size=size, seed=seed)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture
def pool(tmp_path: Path):
    """The same samples as a folder (image + .txt sidecar) and as 3 WebDataset shards, plus
    damage in the shards only: a member that is not an image, a sample with no image."""
    folder, shards = tmp_path / "folder", tmp_path / "shards"
    folder.mkdir()
    shards.mkdir()
    samples = []
    for n, name in enumerate(PHOTOS):
        samples.append((f"{n:09d}", (FIXTURE_IMAGES / name).read_bytes(), f"a photo number {n}"))
    for n in range(len(PHOTOS), 9):
        samples.append((f"{n:09d}", jpeg_bytes(n), f"a generated picture {n}"))
    for shard in range(3):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for key, data, caption in samples[shard * 3 : shard * 3 + 3]:
                add_member(tar, f"{key}.jpg", data)
                add_member(tar, f"{key}.txt", caption.encode())
                add_member(tar, f"{key}.json", json.dumps({"caption": caption, "url": "http://x"}).encode())
                (folder / f"{key}.jpg").write_bytes(data)
                (folder / f"{key}.txt").write_text(caption)
            if shard == 1:
                add_member(tar, "zzbad.jpg", b"this is not a jpeg")
                add_member(tar, "zznoimage.txt", b"a caption without its image")
    return folder, shards, samples


def by_key(path: Path, strip_extension: bool = True) -> dict:
    rows = pq.read_table(path).to_pylist()
    out = {}
    for row in rows:
        key = row["path"].rsplit("/", 1)[-1]
        out[key.rsplit(".", 1)[0] if strip_extension else key] = row
    return out


def same_values(a: dict, b: dict, columns) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for column in columns:
            x, y = a[key][column], b[key][column]
            if isinstance(x, float):
                assert abs(x - y) < 1e-6, (key, column, x, y)
            else:
                assert x == y, (key, column, x, y)


# ----------------------------------------------------------------------------
# Names: brace ranges, WebDataset keys, tar parsing
# ----------------------------------------------------------------------------


def test_brace_expansion_ranges_lists_and_refusals():
    assert expand_braces("p/{00000..00002}.tar") == ["p/00000.tar", "p/00001.tar", "p/00002.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(InputError, match="closing"):
        expand_braces("p/{0..3.tar")
    with pytest.raises(InputError, match="neither"):
        expand_braces("p/{abc}.tar")


def test_webdataset_keys_with_dots_folders_and_duplicates(tmp_path):
    shard = tmp_path / "000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "dir.v1/a.jpg", jpeg_bytes(1))
        add_member(tar, "dir.v1/a.txt", b"first")
        add_member(tar, "b.0001.jpg", jpeg_bytes(2))  # key b, extension 0001.jpg: still the image
        add_member(tar, "README", b"no extension: not part of a sample")
        add_member(tar, "c.seg.png", b"x")
        add_member(tar, "c.jpg", jpeg_bytes(3))  # a plain image extension wins over a mask
        add_member(tar, "dir.v1/a.json", b"{}")  # key seen before, not consecutive: skipped
    warnings: list[str] = []
    items = find_images([str(shard)], warnings=warnings)
    assert [it.relpath for it in items] == ["000.tar/b", "000.tar/c", "000.tar/dir.v1/a"]
    assert all(it.shard == "000.tar" for it in items)
    assert read_sidecar(items[2], ".txt") == b"first"
    assert read_item(items[1]).data == jpeg_bytes(3)  # c.jpg, not the c.seg.png mask listed before it
    assert any("repeat a key" in w for w in warnings)


def test_tar_headers_parsed_as_tarfile_does_including_long_names(tmp_path):
    shard = tmp_path / "long.tar"
    long_name = "deep/" * 30 + "k.jpg"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, long_name, b"1234")
        add_member(tar, "short.txt", b"ab")
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, long_name, b"1234")
        add_member(tar, "ünïcode.txt", b"ab")
    with tarfile.open(shard) as tar:
        expected = [(i.name, i.offset_data, i.size) for i in tar if i.isfile()]
    with open(shard, "rb") as f:
        assert [(m.name, m.offset, m.size) for m in iter_members(f)] == expected


def test_truncated_and_missing_shards_are_error_rows(tmp_path, pool):
    _, shards, _ = pool
    data = (shards / "00002.tar").read_bytes()
    with tarfile.open(shards / "00002.tar") as tar:
        third = [i for i in tar if i.name.endswith(".jpg")][1]
    (shards / "00002.tar").write_bytes(data[: third.offset_data + 100])  # cut inside an image
    (shards / "00003.tar").write_bytes(data[:300])  # cut inside the first header
    items = find_images([str(shards / "{00000..00004}.tar")])
    errors = {}
    for item in items:
        try:
            read_item(item)
        except Exception as exc:
            errors[item.relpath] = str(exc)
    assert "truncated tar: member" in errors["00002.tar/000000007"]
    assert "shard not found" in errors["00004.tar"]
    assert "truncated" in errors["00003.tar"] and "before any sample" in errors["00003.tar"]
    assert "after 2 samples" in errors["00002.tar"]  # the samples before the cut keep their rows
    assert "000000006" not in str(errors)
    assert "not a jpeg" not in str(errors)
    # a single missing shard named directly is the user's mistake: one line, exit 2
    with pytest.raises(InputError, match="input not found"):
        find_images([str(shards / "99999.tar")])


# ----------------------------------------------------------------------------
# Same rows as a folder
# ----------------------------------------------------------------------------


def test_classify_and_clip_score_on_shards_equal_the_folder(pool, tmp_path):
    folder, shards, _ = pool
    before = snapshot(folder, shards)
    for command, extra, columns in (
        ("classify", TINY_CNN, ["top_indices", "top_probs", "width", "height", "content_hash"]),
        ("clip-score", [*TINY_CLIP, "--sidecar"], ["clip_score", "cosine", "caption", "content_hash"]),
    ):
        out_dir, out_tar = tmp_path / f"{command}-dir.parquet", tmp_path / f"{command}-tar.parquet"
        assert invoke_cli(command, folder, *extra, "-o", out_dir).exit_code == 0
        result = invoke_cli(command, str(shards / "{00000..00002}.tar"), *extra, "-o", out_tar)
        assert result.exit_code == 0, result.output
        from_dir, from_tar = by_key(out_dir), by_key(out_tar)
        assert from_tar.pop("zzbad")["error"].startswith("not an image")
        assert "no image member" in from_tar.pop("zznoimage")["error"]
        same_values(from_dir, from_tar, columns)
        table = pq.read_table(out_tar)
        assert table.column("path").to_pylist()[0] == "00000.tar/000000000"
        assert set(table.column("shard").to_pylist()) == {"00000.tar", "00001.tar", "00002.tar"}
        assert table.column("path").to_pylist() == sorted(table.column("path").to_pylist())
    assert snapshot(folder, shards) == before


@pytest.mark.slow
def test_select_data_on_shards_equals_the_folder_and_writes_shards(pool, tmp_path):
    folder, shards, samples = pool
    # every photo twice in the pool (a second shard holds exact copies): dedup must find them
    with tarfile.open(shards / "00003.tar", "w") as tar:
        for key, data, _caption in samples[:4]:
            add_member(tar, f"copy{key}.jpg", data)
            (folder / f"copy{key}.jpg").write_bytes(data)
    common = ["--model", "efficientnet-lite0", *CPU, "--strategy", "kcenter", "--budget", "6"]
    assert invoke_cli("select-data", folder, *common, "-o", tmp_path / "dir.parquet").exit_code == 0
    out = tmp_path / "written"
    result = invoke_cli(
        "select-data", shards, *common, "-o", tmp_path / "tar.parquet", "--write-shards", out, "--shard-size", "4"
    )
    assert result.exit_code == 0, result.output
    from_dir, from_tar = by_key(tmp_path / "dir.parquet"), by_key(tmp_path / "tar.parquet")
    del from_tar["zzbad"], from_tar["zznoimage"]
    same_values(from_dir, from_tar, ["selected", "reason", "rank", "content_hash"])
    selected = sorted(k for k, r in from_tar.items() if r["selected"])
    assert 0 < len(selected) <= 6
    assert not any(k.startswith("copy") and k[4:] in selected for k in selected)  # exact copies deduplicated
    # the written shards: numbered without gaps, the selected samples with their sidecars, bytes unchanged
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.tar" for i in range((len(selected) + 3) // 4)]
    written = find_images([str(out)])
    assert sorted(it.relpath.split("/", 1)[1] for it in written) == selected
    originals = {key: data for key, data, _ in samples} | {f"copy{k}": d for k, d, _ in samples[:4]}
    for item in written:
        key = item.relpath.split("/", 1)[1]
        assert read_item(item).data == originals[key]
        assert read_sidecar(item, ".txt") is None or read_sidecar(item, ".txt").decode().startswith("a ")
    manifest = pq.read_table(tmp_path / "tar.parquet").to_pylist()
    placed = {r["written_key"]: r["written_shard"] for r in manifest if r["written_key"]}
    assert sorted(placed) == selected and set(placed.values()) == {p.name for p in out.iterdir()}
    # a second run into the same folder is refused, nothing replaced
    again = invoke_cli(
        "select-data", shards, *common, "-o", tmp_path / "tar2.parquet", "--write-shards", out, "--shard-size", "4"
    )
    assert_one_line_error(again, 2, "already holds")
    assert_one_line_error(
        invoke_cli("select-data", shards, *common, "-o", tmp_path / "t3.parquet", "--write-shards", shards), 2, "input"
    )


def test_resume_on_shards_skips_done_keys_and_redoes_changed_members(pool, tmp_path):
    _, shards, samples = pool
    out = tmp_path / "out.parquet"
    assert invoke_cli("classify", shards, *TINY_CNN, "-o", out).exit_code == 0
    result = invoke_cli("classify", shards, *TINY_CNN, "-o", out, "--resume", "--json")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == 11 and summary["changed"] == 0, summary
    # replace one sample's image inside shard 0: only that key is redone
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for n, (key, data, _caption) in enumerate(samples[:3]):
            add_member(tar, f"{key}.jpg", jpeg_bytes(77) if n == 1 else data)
    result = invoke_cli("classify", shards, *TINY_CNN, "-o", out, "--resume", "--json")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["changed"] == 1 and summary["resumed"] == 10, summary


def test_shard_option_partitions_whole_tars_and_limit_stops_listing(pool):
    _, shards, _ = pool
    everything = [it.relpath for it in find_images([str(shards)])]
    parts = [[it.relpath for it in find_images([str(shards)], SourceOptions(shard=(i, 2)))] for i in range(2)]
    assert sorted(parts[0] + parts[1]) == everything
    for part in parts:  # a tar is never split between parts
        tars = {p.split("/")[0] for p in part}
        assert not tars & {p.split("/")[0] for p in (parts[1] if part is parts[0] else parts[0])}
    assert [it.relpath for it in find_images([str(shards)], SourceOptions(limit=4))] == everything[:4]


# ----------------------------------------------------------------------------
# Parquet / Arrow tables of images
# ----------------------------------------------------------------------------


def test_image_tables_bytes_struct_and_paths_equal_the_folder(pool, tmp_path):
    folder, _, samples = pool
    keys = [key for key, _, _ in samples]
    data = [d for _, d, _ in samples]
    captions = [c for _, _, c in samples]
    tables = tmp_path / "tables"
    tables.mkdir()
    pq.write_table(
        pa.table({"image": data, "caption": captions, "uid": keys}), tables / "bytes.parquet", row_group_size=4
    )
    struct = pa.array([{"bytes": d, "path": f"{k}.jpg"} for k, d in zip(keys, data)])
    pq.write_table(pa.table({"img": struct, "text": captions}), tables / "hf.parquet")
    pq.write_table(pa.table({"file": [str(folder / f"{k}.jpg") for k in keys]}), tables / "paths.parquet")
    out = tmp_path / "dir.parquet"
    assert invoke_cli("clip-score", folder, *TINY_CLIP, "--sidecar", "-o", out).exit_code == 0
    reference = by_key(out)
    for table, extra in (
        ("bytes.parquet", ["--keep-columns", "uid"]),
        ("hf.parquet", ["--image-column", "img", "--caption-column", "text"]),
    ):
        result = invoke_cli("clip-score", tables / table, *TINY_CLIP, "--sidecar", *extra, "-o", tmp_path / table)
        assert result.exit_code == 0, result.output
        rows = pq.read_table(tmp_path / table).to_pylist()
        assert [r["path"] for r in rows] == [f"{table}/{i:09d}" for i in range(len(keys))]
        got = {keys[i]: row for i, row in enumerate(rows)}
        same_values(reference, got, ["clip_score", "caption", "content_hash"])
        if "uid" in extra:
            assert [r["uid"] for r in rows] == keys
    result = invoke_cli("classify", tables / "paths.parquet", *TINY_CNN, "--image-column", "file", "-o", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in pq.read_table(tmp_path / "p").to_pylist()] == ["ok"] * len(keys)


def test_table_misuse_is_one_line(pool, tmp_path):
    folder, _, _ = pool
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"picture": [b"x"]}), table)
    assert_one_line_error(invoke_cli("classify", table, *TINY_CNN, "-o", tmp_path / "o"), 2, "--image-column")
    assert_one_line_error(
        invoke_cli("classify", table, *TINY_CNN, "--image-column", "picture", "--keep-columns", "nope", "-o", "o"),
        2,
        "--keep-columns 'nope' names no column",
    )
    assert_one_line_error(
        invoke_cli("classify", folder, *TINY_CNN, "--image-column", "x", "-o", tmp_path / "o"), 2, "INPUT tables"
    )
    result = invoke_cli("classify", table, *TINY_CNN, "--image-column", "picture", "-o", tmp_path / "o.parquet")
    assert result.exit_code == 0
    assert pq.read_table(tmp_path / "o.parquet").column("error").to_pylist() == [
        "not an image (unrecognized file format)"
    ]


# ----------------------------------------------------------------------------
# URLs through fsspec (memory:// in this process)
# ----------------------------------------------------------------------------


def test_memory_urls_read_shards_and_objects(pool, tmp_path):
    import fsspec

    folder, shards, _ = pool
    fs = fsspec.filesystem("memory")
    for path in shards.iterdir():
        fs.pipe_file(f"/pool/{path.name}", path.read_bytes())
    for path in folder.iterdir():
        fs.pipe_file(f"/loose/{path.name}", path.read_bytes())
    local = {it.relpath: read_item(it).content_hash for it in find_images([str(shards)]) if "zz" not in it.relpath}
    remote = {it.relpath: read_item(it).content_hash for it in find_images(["memory://pool/"]) if it.ref.image}
    assert remote.pop("00001.tar/zzbad") and remote == local and len(remote) == 9
    loose = find_images(["memory://loose"])
    assert len(loose) == 9 and loose[0].relpath == "000000000.jpg"
    assert read_sidecar(loose[0], ".txt") == b"a photo number 0"
    with pytest.raises(InputError, match="input not found"):
        find_images(["memory://nowhere/"])


def test_clip_score_embeddings_of_shards_serve_select_data_as_its_cache(pool, tmp_path):
    _, shards, _ = pool
    cache = tmp_path / "scores.parquet"
    result = invoke_cli(
        "clip-score", shards, *TINY_CLIP, "--sidecar", "--save-embeddings", "--save-mirrored", "-o", cache
    )
    assert result.exit_code == 0, result.output
    paths = pq.read_table(cache).column("path").to_pylist()
    assert "00001.tar/000000003" in paths
    selected = invoke_cli("select-data", shards, *TINY_CLIP, "--cache", cache, "--json", "-o", tmp_path / "m.parquet")
    assert selected.exit_code == 0, selected.output
    # every image found in the cache by its SHARD/KEY; only the two damaged samples are tried again
    assert json.loads(selected.stdout.strip().splitlines()[-1])["embedded"] == 2


def test_missing_storage_backend_names_the_extra():
    with pytest.raises(InputError, match=r"pip install 'visbatch\[gcs\]'"):
        find_images(["gs://some-bucket/pool/00000.tar"])
    with pytest.raises(InputError, match="Protocol not known"):
        find_images(["nosuchprotocol://x/y.tar"])
