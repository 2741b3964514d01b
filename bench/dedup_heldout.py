"""select-data dedup on photos its default threshold was never measured on.

The 0.85 default for classifier features was measured on the 4 photos of
fixtures/images; this runs on the other photos of fixtures/photos (15 of
them), each with 3 planted copies: half size, JPEG quality 35, and a 90%
centre crop mirrored left-right. A perfect dedup keeps exactly one image per
photo and merges nothing across photos. Run by hand:

    .venv/bin/python bench/dedup_heldout.py [--threshold 0.85] [--no-mirror]

Prints one JSON row: groups, groups keeping more than one image, copies
found (recall), false merges.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
from photo_sets import PHOTOS, planted_copies, stem_of  # noqa: E402

SEEN = {"chelsea", "coffee", "rocket", "astronaut"}  # the photos the default was measured on


def score(rows: list[dict], stems: list[str]) -> dict:
    """Groups keeping more than one image, copies found, false merges (a copy tied to another photo)."""
    kept_paths: dict[str, list[str]] = {s: [] for s in stems}
    found = false = 0
    for row in rows:
        stem = stem_of(row["path"], stems)
        if row["reason"] == "kept":
            kept_paths[stem].append(row["path"])
        elif row["reason"] == "near_duplicate":
            if stem_of(row["duplicate_of"], stems) == stem:
                found += 1
            else:
                false += 1
    copies = 3 * len(stems)
    return {
        "groups": len(stems),
        "groups_keeping_more_than_one": sum(len(p) > 1 for p in kept_paths.values()),
        "groups_keeping_none": sum(not p for p in kept_paths.values()),
        "copies_found": found,
        "copies": copies,
        "recall": found / copies,
        "false_merges": false,
        "groups_split": {s: p for s, p in kept_paths.items() if len(p) > 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--no-mirror", action="store_true")
    parser.add_argument("--model", default="efficientnet-lite0")
    args = parser.parse_args()
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from visbatch.cli.main import app

    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        photos = [p for p in sorted(PHOTOS.rglob("*.jpg")) if p.stem not in SEEN]
        stems = planted_copies(pool, photos)
        out = Path(tmp) / "m.parquet"
        argv = ["select-data", str(pool), "-o", str(out), "--model", args.model, "--device", "cpu", "--workers", "0"]
        argv += ["--dedup-threshold", str(args.threshold)] if args.threshold is not None else []
        argv += ["--no-mirror"] if args.no_mirror else []
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        print(
            json.dumps(
                {
                    "threshold": args.threshold,
                    "mirror": not args.no_mirror,
                    **score(pq.read_table(out).to_pylist(), stems),
                }
            )
        )


if __name__ == "__main__":
    main()
