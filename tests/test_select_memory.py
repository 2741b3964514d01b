"""Memory of select-data's reduce on a large pool of embeddings: bytes per image.

Each run is a fresh process (peak RSS is per process) over a synthetic embedding cache of 512-d
fp16 vectors in clusters with near copies. The reduce reads the cache into one fp16 matrix
(rows keep only their small columns), and the selection takes a chunk or a cluster at a time
to fp32, so the pool's embeddings cost about 2 bytes x dimension per image, never 4 bytes (fp32)
or the 16 KB a 512-d embedding costs as a Python list. The older reading is measured beside it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
DIM = 512
BOUND = 4 * 1024  # bytes per image at 512-d

PROBE = """
import sys
# The peak of this process alone: a child's maxrss starts at its parent's size (a large pytest),
# so the high-water mark is reset here and read from /proc at the end.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
import numpy as np, pyarrow.parquet as pq, torch
from visbatch.core.tasks.select import _matrix
from visbatch.core.tasks.select.cache import read_embedding_rows
from visbatch.core.tasks.select.stages import SelectOptions, select

path, how = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
if how == "fp16":
    rows = read_embedding_rows(path)
else:  # what select-data did before: Python lists of floats, then an fp32 matrix
    rows = pq.read_table(path).to_pylist()
ok = np.array([r["image_embedding"] is not None for r in rows])
if how == "fp16":
    embeddings = _matrix(rows, ok, "image_embedding", torch.device("cpu"))
else:
    matrix = torch.tensor(np.stack([r["image_embedding"] for r in rows]), dtype=torch.float32)
    embeddings = torch.nn.functional.normalize(matrix, dim=1)
options = SelectOptions(budget=0.5, dedup_threshold=0.95, mirror=False, clusters=64)
selection = select(embeddings, ok, [None] * len(rows), options)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(len(rows), selection.report["near_duplicates"], peak * 1024)
"""


def _cache(path, n: int, seed: int = 0) -> int:
    """n embeddings: n/20 centres, each image a centre plus noise; every tenth image a near copy of the one before."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 20), DIM)).astype(np.float32)
    x = centres[rng.integers(0, centres.shape[0], n)] + 0.8 * rng.standard_normal((n, DIM)).astype(np.float32)
    copies = np.arange(1, n, 10)
    x[copies] = x[copies - 1] + 0.02 * rng.standard_normal((copies.size, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    values = pa.array(x.astype(np.float16).reshape(-1), type=pa.float16())
    table = pa.table(
        {
            "path": [f"{i:08d}.jpg" for i in range(n)],
            "status": ["ok"] * n,
            "image_embedding": pa.FixedSizeListArray.from_arrays(values, DIM),
        }
    )
    pq.write_table(table, path, row_group_size=8192)  # as visbatch writes its caches
    return copies.size


def _peak(probe, path, how, n) -> int:
    result = subprocess.run([sys.executable, str(probe), str(path), how], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows, near, peak = map(int, result.stdout.split())
    assert rows == n and near >= n // 10 - 1  # the planted copies are found: the reduce did its work
    return peak


def test_select_reduce_holds_embeddings_in_fp16(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    # Both fp16 pools past one chunk (65,536 rows), so the chunks' fp32 copies, a fixed cost, cancel
    # out; the old reading grows per row from the start and is measured on smaller pools.
    sizes = {"fp16": (70_000, 140_000), "lists": (5_000, 15_000)}
    figures = {}
    for how, (small_n, large_n) in sizes.items():
        for n in (small_n, large_n):
            _cache(tmp_path / f"{n}.parquet", n)
        small, large = (_peak(probe, tmp_path / f"{n}.parquet", how, n) for n in (small_n, large_n))
        figures[how] = (large - small) / (large_n - small_n)
    print(f"bytes per 512-d image: fp16 {figures['fp16']:.0f}, lists + fp32 {figures['lists']:.0f}")
    assert figures["fp16"] < BOUND, figures
    assert figures["fp16"] < figures["lists"] / 3, figures
