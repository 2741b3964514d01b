"""The run plan: one canonical form for every path, one check of every planned write against every
input, writes admitted one by one. Unit tests of core/plan.py, then the five ways a new user
destroyed input files before the plan existed (each failed on the code before it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE_IMAGES, assert_one_line_error, invoke_cli, snapshot, write_image
from visbatch.core.plan import InputSet, OutputOverlapsInput, RunPlan, WriteRefused, canonical

TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]


def _photos(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ["chelsea.jpg", "coffee.jpg", "space/rocket.jpg", "space/astronaut.jpg"][:count]:
        (folder / os.path.basename(name)).write_bytes((FIXTURE_IMAGES / name).read_bytes())
    return folder


# -- the canonical form ---------------------------------------------------------------------


def test_canonical_forms_of_one_place_are_equal(tmp_path):
    real = tmp_path / "data" / "photos"
    real.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(real)
    forms = [
        str(real),
        str(real) + "/",
        f"file://{real}",
        f"file://localhost{real}",
        str(tmp_path / "alias"),
        str(tmp_path / "data" / "x" / ".." / "photos"),
        f"file://{tmp_path / 'alias'}/",
    ]
    assert {canonical(f).text for f in forms} == {str(real.resolve())}
    # A path that does not exist yet: its existing folders are resolved.
    assert canonical(tmp_path / "alias" / "new" / "x.parquet").text == str(real.resolve() / "new" / "x.parquet")


def test_canonical_urls_fold_aliases_and_normalise_keys():
    same = [
        "s3://bkt/in/coffee.jpg",
        "s3a://bkt/in/coffee.jpg",
        "S3N://BKT/in//coffee.jpg",
        "s3://bkt/in/./x/../coffee.jpg",
    ]
    assert {canonical(u).text for u in same} == {"s3://bkt/in/coffee.jpg"}
    assert canonical("s3a://bkt/in/").text == "s3://bkt/in"
    assert canonical("gcs://b/k").text == canonical("gs://b/k").text
    assert canonical("s3://bkt/in/coffee.jpg").inside(canonical("s3a://bkt/in"))
    assert not canonical("s3://bkt/in2/x").inside(canonical("s3://bkt/in"))
    assert not canonical("gs://bkt/in/x").inside(canonical("s3://bkt/in"))


# -- the check ------------------------------------------------------------------------------


def _plan(folders=(), files=()) -> RunPlan:
    plan = RunPlan(InputSet())
    for folder in folders:
        plan.inputs.add_folder(folder)
    for file in files:
        plan.inputs.add_file(file)
    return plan


def test_a_planned_folder_holding_an_input_is_refused(tmp_path):
    photos = tmp_path / "d" / "out.parquet.parts" / "photos"
    photos.mkdir(parents=True)
    plan = _plan(folders=[photos])
    plan.write_results(tmp_path / "d" / "out.parquet")
    with pytest.raises(OutputOverlapsInput, match="holds the input folder"):
        plan.check()


@pytest.mark.parametrize("relation", ["equal", "inside", "holds"])
def test_each_relation_is_refused_both_ways(tmp_path, relation):
    inputs = tmp_path / "in"
    _photos(inputs, 1)
    target = {"equal": inputs, "inside": inputs / "sub", "holds": tmp_path}[relation]
    for declare in (RunPlan.write_folder, RunPlan.write_private_folder):
        plan = _plan(folders=[inputs])
        declare(plan, target, "--overlays folder")
        with pytest.raises(OutputOverlapsInput):
            plan.check()


def test_an_output_beside_an_input_file_is_allowed_and_the_file_itself_is_not(tmp_path):
    photo = _photos(tmp_path / "one", 1) / "chelsea.jpg"
    plan = _plan(files=[photo])
    plan.write_results(tmp_path / "one" / "x.parquet")
    plan.check()
    plan = _plan(files=[photo])
    plan.write_results(photo)
    with pytest.raises(OutputOverlapsInput, match="is the input file"):
        plan.check()


def test_a_hard_link_of_an_input_is_that_input(tmp_path):
    photo = _photos(tmp_path / "in", 1) / "chelsea.jpg"
    os.link(photo, tmp_path / "out.parquet")
    plan = _plan(folders=[tmp_path / "in"])
    plan.write_results(tmp_path / "out.parquet")
    with pytest.raises(OutputOverlapsInput, match="hard link"):
        plan.check()


def test_item_inputs_are_checked_one_by_one(tmp_path):
    from visbatch.core.sources import ImageItem

    photo = _photos(tmp_path / "imgs", 1) / "chelsea.jpg"
    plan = RunPlan(InputSet())
    plan.inputs.add_items([ImageItem(str(tmp_path / "imgs"), "chelsea.jpg")])
    plan.write_file(photo, "report")
    with pytest.raises(OutputOverlapsInput, match="is the input file"):
        plan.check()
    # A caption sidecar an image would be read with is the image's input too.
    plan = RunPlan(InputSet())
    plan.inputs.add_items([ImageItem(str(tmp_path / "imgs"), "chelsea.jpg")])
    plan.write_file(tmp_path / "imgs" / "chelsea.txt", "report")
    with pytest.raises(OutputOverlapsInput):
        plan.check()


def test_planned_writes_must_not_collide(tmp_path):
    plan = RunPlan()
    plan.write_results(tmp_path / "x.html")
    plan.write_file(tmp_path / "x.html", "report")
    with pytest.raises(OutputOverlapsInput, match="one would replace the other"):
        plan.check()
    plan = RunPlan()
    plan.write_results(tmp_path / "out.parquet")
    plan.write_folder(tmp_path / "out.parquet.parts" / "overlays", "--overlays folder")
    with pytest.raises(OutputOverlapsInput, match="lies inside the output parts folder"):
        plan.check()
    plan = RunPlan()  # overlays and maps may share a folder: their names differ
    plan.write_folder(tmp_path / "ov", "--overlays folder")
    plan.write_folder(tmp_path / "ov", "--save-maps folder")
    plan.check()


def test_only_planned_writes_are_admitted_and_links_out_of_a_folder_are_refused(tmp_path):
    from visbatch.core.files import atomic_write_bytes

    inputs = _photos(tmp_path / "in", 1)
    (tmp_path / "ov").mkdir()
    (tmp_path / "ov" / "escape").symlink_to(inputs)
    plan = _plan(folders=[inputs])
    plan.write_folder(tmp_path / "ov", "--overlays folder")
    plan.write_file(tmp_path / "r.html", "report")
    with plan.activated():
        atomic_write_bytes(tmp_path / "r.html", b"ok")
        atomic_write_bytes(tmp_path / "ov" / "a" / "b.png", b"ok", within=tmp_path / "ov")
        with pytest.raises(WriteRefused, match="inside the input folder"):
            atomic_write_bytes(tmp_path / "ov" / "escape" / "chelsea.jpg", b"x", within=tmp_path / "ov")
        with pytest.raises(WriteRefused, match="outside every path"):
            atomic_write_bytes(tmp_path / "elsewhere.txt", b"x")
        with pytest.raises(WriteRefused, match="would land on the report"):
            atomic_write_bytes(tmp_path / "r.html", b"x", within=tmp_path)
    assert (inputs / "chelsea.jpg").read_bytes() == (FIXTURE_IMAGES / "chelsea.jpg").read_bytes()
    assert not (tmp_path / "elsewhere.txt").exists()
    # Outside a run nothing is checked (a library user's own writes).
    atomic_write_bytes(tmp_path / "elsewhere.txt", b"free")


# -- the five ways inputs were destroyed (each failed before the plan) ------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_1_the_parts_cleanup_never_deletes_an_input_folder(tmp_path, resume):
    photos = _photos(tmp_path / "d" / "out.parquet.parts" / "photos")
    before = snapshot(photos)
    args = ["classify", *TINY_CNN, photos, "-o", tmp_path / "d" / "out.parquet", "--overwrite"]
    result = invoke_cli(*args, *(["--resume"] if resume else []))
    assert_one_line_error(result, 2, "holds the input folder")
    assert snapshot(photos) == before
    assert not (tmp_path / "d" / "out.parquet").exists() and not (tmp_path / "d" / "out.parquet.lock").exists()


@pytest.mark.slow
def test_1_detect_aigi_eval_never_deletes_a_root_inside_its_features_parts(tmp_path):
    data = tmp_path / "e" / "r.parquet.features.parquet.parts" / "data"
    for label, seed in (("0_real", 0), ("1_fake", 10)):
        for n in range(3):
            write_image(data / label / f"{n}.png", seed=seed + n, size=(64, 64))
    detector = tmp_path / "det.safetensors"
    trained = invoke_cli(
        "detect-aigi", "train", data, "--features", "npr", "--device", "cpu", "--holdout", "0.34", "-o", detector
    )
    assert trained.exit_code == 0, trained.stderr
    before = snapshot(data)
    result = invoke_cli(
        "detect-aigi", "eval", data, "--detector", detector, "--device", "cpu", "-o", tmp_path / "e" / "r.parquet"
    )
    assert_one_line_error(result, 2, "holds the input folder")
    assert snapshot(data) == before


def test_2_file_urls_are_the_paths_they_name(tmp_path):
    photos = _photos(tmp_path / "photos")
    before = snapshot(photos)
    url = f"file://{photos}"
    for extra, fragment in (
        (["-o", photos / "coffee.jpg"], "is an input"),
        (["-o", tmp_path / "o.parquet", "--overlays", photos], "input folder"),
        (["-o", f"file://{photos}/coffee.jpg"], "is an input"),
    ):
        result = invoke_cli("classify", *TINY_CNN, url, "--overwrite", *extra)
        assert_one_line_error(result, 2, fragment)
    assert snapshot(photos) == before


@pytest.mark.slow
def test_2_write_shards_never_replaces_an_input_shard_named_by_a_file_url(tmp_path):
    import tarfile

    ws = tmp_path / "ws"
    ws.mkdir()
    with tarfile.open(ws / "000000.tar", "w") as tar:
        for n, name in enumerate(["chelsea.jpg", "coffee.jpg"]):
            tar.add(FIXTURE_IMAGES / name, arcname=f"{n:06d}.jpg")
    before = snapshot(ws)
    result = invoke_cli(
        "select-data", "--model", "test-tiny-clip", "--device", "cpu", "--workers", "0",
        f"file://{ws}/000000.tar", "--budget", "1", "--write-shards", ws, "--overwrite", "-o", tmp_path / "s.parquet",
    )  # fmt: skip
    assert_one_line_error(result, 2, "input")
    assert snapshot(ws) == before and not (tmp_path / "s.parquet").exists()
    assert not list(tmp_path.glob("s.embeddings*"))


def test_4_images_a_table_names_are_inputs(tmp_path):
    imgs = _photos(tmp_path / "imgs")
    table = tmp_path / "t" / "pool.parquet"
    table.parent.mkdir()
    pq.write_table(pa.table({"image": ["../imgs/coffee.jpg", "../imgs/chelsea.jpg"]}), table)
    before = snapshot(imgs)
    result = invoke_cli("classify", *TINY_CNN, table, "-o", imgs / "coffee.jpg", "--overwrite")
    assert_one_line_error(result, 2, "is the input file")
    assert snapshot(imgs) == before
    # The same through a manifest, and a table of {bytes, path} structs naming files.
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\nimgs/chelsea.jpg\n")
    result = invoke_cli("classify", *TINY_CNN, "--manifest", manifest, "-o", imgs / "chelsea.jpg", "--overwrite")
    assert_one_line_error(result, 2, "is the input file")
    assert snapshot(imgs) == before


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_5_the_lock_file_is_never_written_through_a_link(tmp_path, link):
    photos = _photos(tmp_path / "photos")
    lock = tmp_path / "out.parquet.lock"
    if link == "hard":
        os.link(photos / "chelsea.jpg", lock)
    else:
        lock.symlink_to(photos / "chelsea.jpg")
    before = snapshot(photos)
    result = invoke_cli("classify", *TINY_CNN, photos, "-o", tmp_path / "out.parquet")
    assert_one_line_error(result, 2, "input")
    assert snapshot(photos) == before


def test_5_a_lock_path_linked_outside_the_inputs_or_holding_another_file_is_refused(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    (tmp_path / "out.parquet.lock").symlink_to(keep)
    result = invoke_cli("classify", *TINY_CNN, photos, "-o", tmp_path / "out.parquet")
    assert_one_line_error(result, 2, "symbolic link")
    (tmp_path / "out.parquet.lock").unlink()
    (tmp_path / "out.parquet.lock").write_text("not a lock")
    result = invoke_cli("classify", *TINY_CNN, photos, "-o", tmp_path / "out.parquet")
    assert_one_line_error(result, 2, "not a visbatch lock file")
    assert keep.read_text() == "mine" and (tmp_path / "out.parquet.lock").read_text() == "not a lock"
    # A stale lock of a killed run (empty, or its JSON) is taken over.
    (tmp_path / "out.parquet.lock").write_text('{"pid": 1, "host": "x", "since": "y"}')
    assert invoke_cli("classify", *TINY_CNN, photos, "-o", tmp_path / "out.parquet").exit_code == 0
    assert not (tmp_path / "out.parquet.lock").exists()


def test_the_parts_folder_holding_foreign_files_is_refused_and_kept(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    result = invoke_cli("classify", *TINY_CNN, photos, "-o", tmp_path / "out.parquet", "--overwrite")
    assert_one_line_error(result, 2, "did not write")
    assert (parts / "notes.txt").read_text() == "mine"


def test_an_output_beside_a_named_input_file_runs(tmp_path):
    one = _photos(tmp_path / "one", 1)
    result = invoke_cli("classify", *TINY_CNN, one / "chelsea.jpg", "-o", one / "x.parquet")
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(one / "x.parquet").num_rows == 1
    assert sorted(p.name for p in one.iterdir()) == ["chelsea.jpg", "x.parquet"]


def test_a_refused_run_creates_nothing(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    shutil.copy(photos / "chelsea.jpg", tmp_path / "keep.jpg")
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    for args in (
        ["-o", photos / "x.parquet"],
        ["-o", tmp_path / "new" / "o.parquet", "--overlays", photos / "ov"],
        ["-o", tmp_path / "x.html", "--report"],
    ):
        result = invoke_cli("classify", *TINY_CNN, photos, *args)
        assert result.exit_code == 2, result.stderr
        assert sorted(str(p) for p in tmp_path.rglob("*")) == listing
