"""--engine local vs --engine ray on one machine: the overhead ratio, and scaling with actors.

Run by hand (not part of the tests):

    .venv/bin/python bench/engines.py --images 256 --actors 1,2,4

Every row is visbatch ``classify`` end to end in its own process (listing, decode, model,
Parquet; for Ray also starting a local cluster and the actors), on the same folder of JPEGs
with the same model. "vs local" is each row's wall time as a ratio of the local engine's:
on a small job it is Ray's fixed cost (cluster start, actor start, model load per actor); on
a GPU cluster the figure to watch is images/s as actors grow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import make_folder  # noqa: E402  (bench/ is on sys.path when run as a script)


def run(folder: Path, out: Path, args, extra: list[str]) -> tuple[float, float]:
    command = [sys.executable, "-m", "visbatch.cli", "classify", str(folder), "-m", args.model,
               "--device", args.device, "-b", str(args.batch_size), "-o", str(out), "--json", "-q",
               *extra]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return wall, summary["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--actors", default="1,2,4")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="decode workers of the local engine")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "folder", args.images)
        rows.append(("local", "-", *run(tmp / "folder", tmp / "local.parquet", args, ["-j", str(args.workers)])))
        for actors in [int(a) for a in args.actors.split(",")]:
            extra = ["--engine", "ray", "--ray-address", "local", "--concurrency", str(actors)]
            rows.append(("ray", str(actors), *run(tmp / "folder", tmp / f"ray-{actors}.parquet", args, extra)))
    base = rows[0][2]
    print(f"{args.images} images, {args.model} on {args.device}, batch {args.batch_size}")
    print("| engine | model actors | wall (s) | images/s (run loop) | wall vs local |")
    print("|---|---|---|---|---|")
    for engine, actors, wall, speed in rows:
        print(f"| {engine} | {actors} | {wall:.1f} | {speed:.1f} | {wall / base:.2f}x |")


if __name__ == "__main__":
    main()
