"""Input sources side by side: a folder of JPEGs vs the same images in tar shards vs a Parquet bytes column.

Run by hand (not part of the tests):

    .venv/bin/python bench/sources.py --images 512 --workers 2

The same JPEGs (random crops of the committed photos at web sizes), the same model and
settings, three ways of storing them on local disk; each row is visbatch ``classify`` end to
end (listing, reading, decoding, model, Parquet), plus the listing alone. The figure is
each source's images/s as a ratio of the folder's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import make_folder  # noqa: E402  (bench/ is on sys.path when run as a script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from visbatch.core.sources import find_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = sorted(make_folder(tmp / "folder", args.images))
        (tmp / "shards").mkdir()
        for start in range(0, len(paths), args.per_shard):
            with tarfile.open(tmp / "shards" / f"{start // args.per_shard:05d}.tar", "w") as tar:
                for n, path in enumerate(paths[start : start + args.per_shard], start):
                    tar.add(path, arcname=f"{n:09d}.jpg")
        table = pa.table({"image": [p.read_bytes() for p in paths]})
        pq.write_table(table, tmp / "pool.parquet", row_group_size=args.per_shard)
        rows = []
        for name, source in (
            ("folder", tmp / "folder"),
            ("tar shards", tmp / "shards"),
            ("parquet", tmp / "pool.parquet"),
        ):
            start = time.perf_counter()
            listed = len(find_images([str(source)]))
            listing = listed / (time.perf_counter() - start)
            command = [sys.executable, "-m", "visbatch.cli", "classify", str(source), "-m", args.model,
                       "--device", args.device, "-j", str(args.workers), "-b", str(args.batch_size),
                       "-o", str(tmp / f"{name}.parquet"), "--json", "-q"]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            summary = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append((name, listed, listing, summary["images_per_s"]))
    base = rows[0][3]
    print("| source | images | listing (samples/s) | classify end to end (img/s) | vs folder |")
    print("|---|---|---|---|---|")
    for name, listed, listing, speed in rows:
        print(f"| {name} | {listed} | {listing:,.0f} | {speed:.1f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
