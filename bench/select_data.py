"""select-data at scale: dedup and selection time and memory for 10k, 100k and 1M embeddings.

(Named select_data.py: a file named select.py would shadow the standard library's select module.)

Run by hand:

    .venv/bin/python bench/select_data.py --sizes 10000 100000 1000000 --strategy cluster-balanced

Synthetic pool: normalized 512-d embeddings drawn around 2,000 centres
(cluster sizes vary), with 5% planted near duplicates (a pool image plus
small noise, cosine about 0.98 to its source). Runs the reduce stage of
select-data (exact-hash stage, k-means with sqrt(n) clusters, SemDeDup at
0.95, budget 30% with the strategy) and reports wall time, the planted
duplicates found, and peak resident memory. The embedding (map) stage is the
pipeline's and is measured by bench/pipeline.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F


def make_pool(n: int, d: int = 512, centres: int = 2000, duplicates: float = 0.05, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(centres, d, generator=generator), dim=1)
    weights = torch.rand(centres, generator=generator) ** 2 + 0.05
    labels = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
    x = F.normalize(means[labels] + 0.08 * torch.randn(n, d, generator=generator), dim=1)
    planted = int(n * duplicates)
    sources = torch.randperm(n - planted, generator=generator)[:planted]
    x[n - planted :] = F.normalize(x[sources] + 0.004 * torch.randn(planted, d, generator=generator), dim=1)
    return x, sources.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--strategy", default="cluster-balanced")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--storage", choices=["fp16", "fp32"], default="fp16", help="how the pool is held (select-data holds fp16)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from visbatch.core.tasks.select import SelectOptions, select

    rows = []
    for n in args.sizes:
        x, sources = make_pool(n)
        planted = len(sources)
        x = x.to(args.device)
        if args.storage == "fp16":
            x = x.half()
        start = time.perf_counter()
        result = select(
            x,
            np.ones(n, dtype=bool),
            [None] * n,
            SelectOptions(budget=0.3, strategy=args.strategy, dedup_threshold=0.95),
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        # A planted pair is found when one of its two images is marked (either may be kept).
        found = sum(
            1
            for copy, source in zip(range(n - planted, n), sources)
            if "near_duplicate" in (result.reason[copy], result.reason[source])
        )
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append(
            {
                "n": n,
                "seconds": elapsed,
                "planted_pairs_found": found / planted,
                "near_duplicates": result.report["near_duplicates"],
                "clusters": result.report["clusters"],
                "selected": result.report["selected"],
                "peak_rss_gb": peak_gb,
            }
        )
        print(
            json.dumps(rows[-1])
            if args.json
            else f"n={n:>9,d}  {elapsed:8.1f} s  planted pairs found {found}/{planted}  "
            f"near duplicates {result.report['near_duplicates']}  clusters {result.report['clusters']}  "
            f"peak RSS {peak_gb:.1f} GB",
            flush=True,
        )
        del x, result


if __name__ == "__main__":
    main()
