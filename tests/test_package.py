"""The wheel holds exactly visbatch.cli and visbatch.core, and every module imports from it."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # subprocesses, the wheel, real weights or held-out runs


def test_wheel_contents_and_imports(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("visbatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("visbatch-")}
    assert top == {"visbatch"}, top  # no generic top-level `cli` or `core`
    modules = sorted(n[:-3].replace("/", ".") for n in names if n.endswith(".py") and not n.endswith("__main__.py"))
    modules = [m.removesuffix(".__init__") for m in modules]
    sources = {
        p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
        for d in ("cli", "core")
        for p in (REPO / d).rglob("*.py")
        if p.name != "__main__.py"
    }
    expected = {"visbatch." + s.removesuffix(".__init__") for s in sources}
    assert set(modules) == expected, set(modules) ^ expected
    assert "visbatch/core/model_configs/test-tiny-clip.json" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code, *modules],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "ok", result.stderr
    # The modules came from the wheel, not the source tree.
    where = subprocess.run(
        [sys.executable, "-c", "import visbatch.core.models as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
    )
    assert where.stdout.startswith(str(target))
