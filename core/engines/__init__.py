"""Where the map stage of a run executes: this process (``local``) or a Ray cluster (``ray``).

The engine only changes who runs decode and ``task.map``: listing, resume
reconciliation, the output's parts, the final sort-and-merge and the summary
stay in :func:`visbatch.core.pipeline.run_pipeline`, so both engines keep the
same output contract. :mod:`.ray_data` is imported only with ``--engine ray``
(Ray is an optional extra).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from visbatch.core.errors import UsageError

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineOptions:
    name: str = "local"
    address: str = "auto"  # auto: the running cluster, else a local one; local: always a new one
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    concurrency: tuple[int, int] | None = None  # (min, max) model actors; None: one per GPU, or 1

    @property
    def is_local(self) -> bool:
        return self.name == "local"

    @classmethod
    def parse(
        cls, name: str, address: str = "auto", gpus_per_worker: float | None = None, concurrency: str | None = None
    ) -> EngineOptions:
        if name not in ENGINES:
            raise UsageError(f"--engine {name!r}: choose local or ray")
        # The Ray settings are checked whatever the engine: a typo is said now, not when the
        # same command line later runs on a cluster.
        parsed = parse_concurrency(concurrency)
        if gpus_per_worker is not None and not gpus_per_worker >= 0:
            raise UsageError(f"--gpus-per-worker {gpus_per_worker}: give a number >= 0")
        if name == "local":
            return cls()
        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pandas") is None:
            raise UsageError("--engine ray needs Ray Data: pip install 'visbatch[ray]'")
        if not address.strip():
            raise UsageError("--ray-address is empty: give auto, local or HOST:PORT")
        return cls(name, address.strip(), gpus_per_worker, parsed)


def parse_concurrency(text: str | None) -> tuple[int, int] | None:
    """``N`` (a fixed pool) or ``MIN,MAX`` (Ray scales between them)."""
    if text is None:
        return None
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or not 1 <= numbers[0] <= numbers[1]:
        raise UsageError(f"--concurrency {text!r}: give N or MIN,MAX with 1 <= MIN <= MAX")
    return numbers[0], numbers[1]
