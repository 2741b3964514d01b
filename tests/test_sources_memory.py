"""Memory on a large shard pool: 100,000 tiny samples in 100 shards, listed and scored.

Each run is a fresh process (peak RSS is per process). The bound, stated in the README: past
the fixed cost of the libraries and the model, memory grows only by the listed items (about
1.3 KB a sample: key, shard, member offsets), never with image bytes or decoded pixels.
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
PER_SAMPLE_BOUND = 2048  # bytes of resident memory per listed sample

PROBE = """
import resource, sys
import pyarrow as pa
from visbatch.core.images import Geometry
from visbatch.core.models import DeviceOnly
from visbatch.core.pipeline import MapOutput, RunConfig, run_pipeline
from visbatch.core.sources import SourceOptions, find_images

class MeanTask:
    name = "mean"
    geometry = Geometry(resize=8, crop=(8, 8), interpolation="bilinear", resize_mode="shortest")
    def fields(self): return [pa.field("mean", pa.float32())]
    def options(self): return {}
    def summary(self): return {}
    def map(self, images, records):
        return MapOutput(rows=[{"mean": float(v)} for v in images.float().mean(dim=(1, 2, 3))])

pool, limit, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
items = find_images([pool], SourceOptions(limit=limit))
config = RunConfig(output=out, batch_size=512, workers=1, quiet=True)
summary = run_pipeline(MeanTask(), DeviceOnly("cpu"), items, config)
print(len(items), summary.ok, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
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


def _peak(probe, pool, limit, out) -> int:
    result = subprocess.run(
        [sys.executable, str(probe), str(pool), str(limit), str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    listed, ok, peak = map(int, result.stdout.split())
    assert listed == ok == limit
    return peak


def test_memory_grows_only_with_the_listed_items(tmp_path):
    _pool(tmp_path / "pool")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    small = _peak(probe, tmp_path / "pool", 10_000, tmp_path / "small.parquet")
    large = _peak(probe, tmp_path / "pool", 100_000, tmp_path / "large.parquet")
    per_sample = (large - small) / 90_000
    assert per_sample < PER_SAMPLE_BOUND, f"{per_sample:.0f} bytes per sample ({small >> 20} -> {large >> 20} MB)"
