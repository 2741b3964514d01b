"""Memory on a large shard pool: 100,000 tiny samples in 100 shards, listed and scored.

Each run is a fresh process (peak RSS is per process). The bound, stated in the README: shards
are listed a chunk at a time as the run reaches them, so past the fixed cost of the libraries,
the model and one chunk of items, memory grows only with the output table the final merge
sorts (its rows: key, status, fingerprint, the task's values), never with the listed items,
image bytes or decoded pixels. A full listing (what the pool jobs need) is measured beside it.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
STREAM_BOUND = 300  # bytes per sample, streamed (measured ~80: the status count and row-group buffers)
LISTED_BOUND = 2048  # per sample when every item is listed first (key, shard, member offsets)

PROBE = """
import resource, sys
import pyarrow as pa
from visbatch.core.images import Geometry
from visbatch.core.models import DeviceOnly
from visbatch.core.pipeline import MapOutput, RunConfig, run_pipeline
from visbatch.core.sources import SourceOptions, find_image_stream, find_images

class MeanTask:
    name = "mean"
    geometry = Geometry(resize=8, crop=(8, 8), interpolation="bilinear", resize_mode="shortest")
    def fields(self): return [pa.field("mean", pa.float32())]
    def options(self): return {}
    def summary(self): return {}
    def map(self, images, records):
        return MapOutput(rows=[{"mean": float(v)} for v in images.float().mean(dim=(1, 2, 3))])

pool, limit, out, how = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
find = find_image_stream if how == "stream" else find_images
items = find([pool], SourceOptions(limit=limit))
config = RunConfig(output=out, batch_size=512, workers=1, quiet=True)
summary = run_pipeline(MeanTask(), DeviceOnly("cpu"), items, config)
print(summary.inputs, summary.ok, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _pool(folder, shards=100, per_shard=1000):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    folder.mkdir()
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(per_shard):
                info = tarfile.TarInfo(f"{s:05d}{k:04d}.png")
                info.size = len(png)
                tar.addfile(info, io.BytesIO(png))


def _peak(probe, pool, limit, out, how) -> int:
    result = subprocess.run(
        [sys.executable, str(probe), str(pool), str(limit), str(out), how], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    listed, ok, peak = map(int, result.stdout.split())
    assert listed == ok == limit
    return peak


@pytest.fixture(scope="module")
def large_pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory") / "pool"
    _pool(folder)
    probe = folder.parent / "probe.py"
    probe.write_text(PROBE)
    return folder, probe


@pytest.mark.parametrize("how,bound", [("stream", STREAM_BOUND), ("listed", LISTED_BOUND)])
def test_memory_per_sample_on_a_large_shard_pool(large_pool, tmp_path, how, bound):
    pool, probe = large_pool
    small = _peak(probe, pool, 10_000, tmp_path / "small.parquet", how)
    large = _peak(probe, pool, 100_000, tmp_path / "large.parquet", how)
    per_sample = (large - small) / 90_000
    print(f"{how}: {per_sample:.0f} bytes per sample ({small >> 20} -> {large >> 20} MB)")
    assert per_sample < bound, f"{per_sample:.0f} bytes per sample ({small >> 20} -> {large >> 20} MB)"
