"""Inputs survive every layout: a generator of input and output layouts, not a list of cases.

Each example builds a fresh tree of inputs (a folder of photos, possibly nested under a name a
run uses for its own files such as ``out.parquet.parts``; files a table or manifest names; a
tar shard), then aims one output of one subcommand at a path derived from an input: the input
itself, a path inside it, its folder, its parent, through a symbolic link, a hard link, a
``file://`` URL, ``..`` segments or a trailing slash; or plants a link at the lock's or
parts folder's name. Whatever the run does (it may succeed, or be refused), every input byte
and inode must be as it was. Seeded and bounded: the same examples on every run.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import invoke_cli, snapshot, write_image

pytestmark = pytest.mark.slow
TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0"]
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]
NESTS = ["", "out.parquet.parts/", "o.parquet.parts/", "out.embeddings.parquet.pending.parquet.parts/", "r.html/"]
SOURCES = ["folder", "file", "manifest", "table", "shard", "file-url"]
ALIASES = ["plain", "symlink", "file-url", "dotted", "slash", "hardlink"]
EXAMPLES = int(os.environ.get("VISBATCH_PROPERTY_EXAMPLES", "30"))


def _build_inputs(base: Path, nest: str) -> dict:
    """The input tree; returns the paths a generator can aim at."""
    data = base / "data"
    photos = data / nest / "photos"
    for n, name in enumerate(["a.jpg", "b.png", "sub/c.jpg"]):
        write_image(photos / name, seed=n, size=(40, 32), fmt="PNG" if name.endswith(".png") else None)
    (photos / "a.txt").write_text("a caption")
    imgs = data / "imgs"
    write_image(imgs / "x.jpg", seed=7)
    write_image(imgs / "y.jpg", seed=8)
    tables = data / "t"
    tables.mkdir(parents=True)
    pq.write_table(pa.table({"image": ["../imgs/x.jpg", "../imgs/y.jpg"]}), tables / "pool.parquet")
    (data / "list.csv").write_text("path\nimgs/x.jpg\nimgs/y.jpg\n")
    shards = data / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        tar.add(imgs / "x.jpg", arcname="000000.jpg")
        tar.add(imgs / "y.jpg", arcname="000001.jpg")
    return {
        "data": data,
        "photos": photos,
        "files": [
            photos / "a.jpg",
            photos / "sub" / "c.jpg",
            photos / "a.txt",
            imgs / "x.jpg",
            tables / "pool.parquet",
        ],
        "folders": [photos, photos / "sub", imgs, shards, data],
        "tables": tables / "pool.parquet",
        "manifest": data / "list.csv",
        "shard": shards / "000000.tar",
    }


def _source_args(layout: dict, source: str) -> list[str]:
    photos = layout["photos"]
    return {
        "folder": [str(photos)],
        "file": [str(photos / "a.jpg"), str(photos / "b.png")],
        "manifest": ["--manifest", str(layout["manifest"])],
        "table": [str(layout["tables"])],
        "shard": [str(layout["shard"])],
        "file-url": [f"file://{photos}"],
    }[source]


def _aim(base: Path, target: Path, alias: str, n: int) -> str:
    """``target`` named another way."""
    alias_dir = base / "alias"
    alias_dir.mkdir(exist_ok=True)
    if alias == "symlink":
        link = alias_dir / f"link{n}"
        if not link.exists():
            link.symlink_to(target)
        return str(link)
    if alias == "file-url":
        return f"file://{target}"
    if alias == "dotted":
        return str(target.parent / "." / ".." / target.parent.name / target.name)
    if alias == "slash" and target.is_dir():
        return str(target) + "/"
    if alias == "hardlink" and target.is_file():
        link = alias_dir / f"hard{n}{target.suffix}"
        if not link.exists():
            os.link(target, link)
        return str(link)
    return str(target)


@st.composite
def aims(draw, layout_keys=("files", "folders")):
    kind = draw(st.sampled_from(layout_keys))
    index = draw(st.integers(0, 4))
    relation = draw(st.sampled_from(["itself", "inside", "beside", "parent"]))
    alias = draw(st.sampled_from(ALIASES))
    return kind, index, relation, alias


def _target(layout: dict, kind: str, index: int, relation: str, suffix: str) -> Path:
    chosen = layout[kind][index % len(layout[kind])]
    if relation == "inside":
        return chosen / f"new{suffix}" if chosen.is_dir() else chosen
    if relation == "beside":
        return chosen.parent / f"beside{suffix}"
    if relation == "parent":
        return chosen.parent
    return chosen


def _inputs_of(layout: dict, source: str) -> list[Path]:
    """What a run over ``source`` reads: its inputs (a folder's whole tree)."""
    photos, imgs = layout["photos"], layout["data"] / "imgs"
    return {
        "folder": [photos],
        "file-url": [photos],
        "file": [photos / "a.jpg", photos / "b.png", photos / "a.txt"],
        "manifest": [layout["manifest"], imgs / "x.jpg", imgs / "y.jpg"],  # the files it names, not their folder
        "table": [layout["tables"], imgs / "x.jpg", imgs / "y.jpg"],
        "shard": [layout["shard"]],
    }[source]


def _aimed(base: Path, nest: str, aim: tuple, suffix: str, n: int = 0) -> tuple[dict, Path, str]:
    """A fresh input tree under ``base`` and the drawn aim at it: (layout, target, the target's spelling)."""
    layout = _build_inputs(base, nest)
    kind, index, relation, alias = aim
    target = _target(layout, kind, index, relation, suffix)
    return layout, target, _aim(base, target, alias, n)


def _run_and_check(base: Path, inputs: list[Path], argv: list) -> None:
    before = snapshot(*inputs)
    files = [p for root in inputs for p in ([root] if root.is_file() else root.rglob("*"))]
    contents = {p: p.read_bytes() for p in files if p.is_file() and not p.is_symlink()}
    result = invoke_cli(*argv)
    event(
        f"exit {result.exit_code}"
        + (f": {result.stderr.strip().splitlines()[-1][:110]}" if result.exit_code == 3 else "")
    )
    assert result.exit_code in (0, 1, 2, 3), (argv, result.output)
    if result.exit_code == 3:
        assert "internal error" not in result.stderr, (argv, result.stderr)
    assert "Traceback" not in result.output, (argv, result.output)
    after = snapshot(*inputs)
    assert after == before, (argv, result.stderr, set(after.items()) ^ set(before.items()))
    for path, data in contents.items():
        assert path.read_bytes() == data, (argv, path)


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("VISBATCH_PROPERTY_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(
    command=st.sampled_from(["classify", "saliency", "clip-score"]),
    nest=st.sampled_from(NESTS),
    source=st.sampled_from(SOURCES),
    role=st.sampled_from(["-o", "--overlays", "--save-maps", "--report", "lock", "parts"]),
    aim=aims(),
    flags=st.sampled_from([[], ["--overwrite"], ["--resume"]]),
)
def test_the_per_image_subcommands_never_touch_an_input(command, nest, source, role, aim, flags):
    if role == "--save-maps" and command != "saliency":
        role = "--overlays"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        alias = aim[3]
        layout, target, aimed = _aimed(base, nest, aim, "" if role in ("--overlays", "--save-maps") else ".parquet")
        out = str(base / "out.parquet")
        extra: list[str] = []
        if role == "-o":
            out = aimed
        elif role in ("--overlays", "--save-maps"):
            extra = [role, aimed]
        elif role == "--report":
            out = os.path.splitext(aimed)[0] + ".parquet"
            extra = ["--report"]
        elif role == "lock":  # a link planted where the run takes its lock
            lock = Path(out + ".lock")
            try:
                (os.link if alias == "hardlink" and target.is_file() else os.symlink)(target, lock)
            except OSError:
                pass
        elif role == "parts":  # the parts folder's name is a link to an input folder
            os.symlink(target if target.is_dir() else target.parent, out + ".parts")
        model = TINY_CLIP if command == "clip-score" else TINY_CNN
        task = {"saliency": ["--method", "gradient"], "clip-score": ["--prompt", "a photo"]}.get(command, [])
        if command == "clip-score" and role in ("--overlays", "--save-maps"):
            extra = []
        argv = [command, *model, *_source_args(layout, source), *task, *extra, *flags, "-o", out]
        _run_and_check(base, _inputs_of(layout, source), argv)


@SETTINGS
@given(
    nest=st.sampled_from(NESTS),
    source=st.sampled_from(["folder", "file", "manifest", "shard", "file-url"]),
    role=st.sampled_from(["-o", "--cache", "--copy-to", "--link-to", "--write-shards"]),
    aim=aims(),
    overwrite=st.booleans(),
)
def test_select_data_never_touches_an_input(nest, source, role, aim, overwrite):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        layout, _, aimed = _aimed(base, nest, aim, ".parquet" if role in ("-o", "--cache") else "")
        out = str(base / "sel.parquet")
        extra: list[str] = []
        if role == "-o":
            out = aimed
        else:
            extra = [role, aimed]
        if source == "shard" and role in ("--copy-to", "--link-to"):
            extra = ["--write-shards", aimed]
        argv = ["select-data", *TINY_CLIP, *_source_args(layout, source), "--budget", "2", *extra, "-o", out]
        _run_and_check(base, _inputs_of(layout, source), argv + (["--overwrite"] if overwrite else []))


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for label, seed in (("0_real", 0), ("1_fake", 50)):
        for n in range(3):
            write_image(root / label / f"{n}.png", seed=seed + n, size=(64, 64), fmt="PNG")
    path = root.parent / "det.safetensors"
    result = invoke_cli(
        "detect-aigi", "train", root, "--features", "npr", "--device", "cpu", "--holdout", "0.34", "-o", path
    )
    assert result.exit_code == 0, result.stderr
    return path


@settings(
    max_examples=max(8, EXAMPLES // 2),
    deadline=None,
    derandomize=not os.environ.get("VISBATCH_PROPERTY_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    command=st.sampled_from(["score", "eval", "train", "quantize", "merge", "report"]),
    nest=st.sampled_from(NESTS + ["r.parquet.features.parquet.parts/"]),
    aim=aims(),
    overwrite=st.booleans(),
)
def test_the_jobs_never_touch_an_input(detector, command, nest, aim, overwrite):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        kind, index, relation, alias = aim
        suffix = {"train": ".safetensors", "quantize": ".safetensors", "report": ".html"}.get(command, ".parquet")
        layout, target, aimed = _aimed(base, nest, aim, suffix)
        photos = layout["photos"]
        # A labelled layout inside the photos folder for the detector's commands.
        for label, seed in (("0_real", 0), ("1_fake", 9)):
            write_image(photos / "lab" / label / "i.png", seed=seed, size=(64, 64), fmt="PNG")
        flags = ["--overwrite"] if overwrite else []
        inputs = [photos, detector]
        if command == "score":
            argv = ["detect-aigi", "score", photos, "--detector", detector, "--device", "cpu", "--heatmaps", aimed]
            argv += ["-o", base / "s.parquet"]
        elif command == "eval":
            argv = ["detect-aigi", "eval", photos / "lab", "--detector", detector, "--device", "cpu", "-o", aimed]
            inputs = [photos / "lab", detector]
        elif command == "train":
            argv = ["detect-aigi", "train", photos / "lab", "--features", "npr", "--device", "cpu", "-o", aimed]
            argv += ["--holdout", "0.5"]
            inputs = [photos / "lab"]
        elif command == "quantize":
            argv = ["quantize", "--calib", photos, *TINY_CNN[:4], "--method", "rtn", "-o", aimed]
        else:
            results = []
            for i in range(2):
                part = layout["data"] / f"part{i}.parquet"
                invoke_cli("classify", *TINY_CNN, photos, "--shard", f"{i}/2", "-o", part)
                results.append(part)
            layout = {**layout, "files": layout["files"] + results}
            target = _target(layout, kind, index, relation, suffix)
            aimed = _aim(base, target, alias, 1)
            argv = ["merge", *results, "-o", aimed] if command == "merge" else ["report", results[0], "-o", aimed]
            inputs = results if command == "merge" else results[:1]
        _run_and_check(base, inputs, [*argv, *flags])
