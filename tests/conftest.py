"""Shared test helpers: generated image folders, CLI runners, paths to fixtures."""

from __future__ import annotations

import json
import os

# Tests never reach a hub: the download code paths run up to the network and fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets: its packaged loaders, never the hub
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The committed photos under fixtures/images (licences in fixtures/README.md).
PHOTOS = ["chelsea.jpg", "coffee.jpg", "space/rocket.jpg", "space/astronaut.jpg"]

REPO = Path(__file__).resolve().parent.parent
FIXTURE_IMAGES = REPO / "fixtures" / "images"
VISBATCH = [sys.executable, "-m", "visbatch.cli"]


def write_image(path: Path, size=(48, 40), seed: int = 0, mode: str = "RGB", fmt: str | None = None, **save) -> Path:
    """A small random image with structure (a gradient plus noise), saved at ``path``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(w + h - 2, 1)], -1)
    array = np.clip(base + rng.integers(-20, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(array, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Ten valid images in two folders, mixed formats and sizes."""
    root = tmp_path / "images"
    for i in range(6):
        write_image(root / f"img_{i:02d}.jpg", size=(40 + 7 * i, 36 + 5 * i), seed=i)
    for i in range(3):
        write_image(root / "sub" / f"pic_{i}.png", size=(50, 30 + 11 * i), seed=10 + i)
    write_image(root / "sub" / "deep" / "last.webp", size=(33, 61), seed=99)
    return root


def run_cli(
    *args: str,
    stdin: str | None = None,
    env: dict | None = None,
    timeout: float = 300,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m visbatch.cli ARGS`` in a subprocess (the real entry point)."""
    full_env = {**os.environ, "VISBATCH_WORKERS": os.environ.get("VISBATCH_WORKERS", "0"), **(env or {})}
    return subprocess.run(
        [*VISBATCH, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


def summary_json(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON on stdout: {result.stdout!r} / {result.stderr!r}"
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def fixture_images() -> Path:
    return FIXTURE_IMAGES


@pytest.fixture
def copy_fixtures(tmp_path: Path) -> Path:
    target = tmp_path / "photos"
    shutil.copytree(FIXTURE_IMAGES, target)
    return target


def assert_usage_error(command: str, inputs, output, args, message: str) -> None:
    """``visbatch COMMAND INPUTS -o OUTPUT ARGS`` on CPU exits 2 with ``message`` on stderr, no traceback."""
    from typer.testing import CliRunner

    from visbatch.cli.main import app

    result = CliRunner().invoke(
        app, [command, "--device", "cpu", "--workers", "0", str(inputs), "-o", str(output), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def snapshot(*roots: Path) -> dict:
    """Every file and link under ``roots`` with its bytes' hash, size, mode, mtime and inode: an
    input tree that must come out of a run exactly as it went in."""
    import hashlib

    state = {}
    for root in roots:
        root = Path(root)
        paths = [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
        for path in paths:
            st = os.lstat(path)
            entry = (st.st_mode, st.st_ino, st.st_nlink, st.st_mtime_ns)
            if path.is_symlink():
                entry += ("link", os.readlink(path))
            elif path.is_file():
                entry += (st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            state[str(path)] = entry
    return state


def invoke_cli(*args, input=None, env=None):
    """``visbatch ARGS`` in this process (Typer's runner), as ``main()`` runs it."""
    from typer.testing import CliRunner

    from visbatch.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)


def assert_one_line_error(result, code: int, fragment: str = "") -> None:
    """Exit ``code``, one ``visbatch: error:`` line on stderr containing ``fragment``, no traceback."""
    stderr = result.stderr
    got = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert got == code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("visbatch: error:")]
    assert len(errors) == 1, stderr
    assert fragment in errors[0], stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="session", autouse=True)
def the_repository_stays_clean():
    """No test's run may write into the working folder it was started from (the repository): a
    run writes only the paths it planned (a file URL that once became a relative 'file:' folder
    here is the case this catches)."""

    def untracked() -> set[str]:
        try:
            out = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=all"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return set()
        return {line[3:] for line in out.splitlines() if line.startswith("??")}

    before = untracked()
    yield
    appeared = sorted(untracked() - before)
    assert not appeared, f"the tests left files in the repository: {appeared[:5]}"
