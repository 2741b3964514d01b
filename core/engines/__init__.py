"""Where the map stage of a run executes: this process (``local``) or a Ray cluster (``ray``).

An engine only changes who runs decode and ``task.map``: listing, resume
reconciliation, the output, the final sort-and-merge and the summary stay in
:func:`visbatch.core.pipeline.run_pipeline`, which knows engines only by the
:class:`Engine` interface below, so every engine keeps the same output contract. Both
engines run a batch through :mod:`visbatch.core.batches`, so their rows are the same.

A new engine (a job-array runner, Spark, Daft) is one module here with an
``open_engine(options) -> Engine`` function, named in :data:`ENGINE_MODULES` and
imported only when chosen (:mod:`.ray_data` needs the optional Ray extra).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from visbatch.core.errors import UsageError

# --engine NAME -> the module that runs it (imported by name, only when chosen).
ENGINE_MODULES = {"local": "visbatch.core.engines.local", "ray": "visbatch.core.engines.ray_data"}


@dataclass
class Committed:
    """One batch an engine has written to the output: its counts, up to 5 error examples, and
    the overlays it drew itself (an engine whose workers write them; 0 when the run's sink did)."""

    ok: int
    failed: int
    errors: list[str]
    overlays: int = 0


@dataclass
class EngineRun:
    """What an engine gets for one run: the task and model, the run's settings, the output
    writer (the parts folder and schema), and the overlay and map sinks of the driver."""

    task: Any
    model: Any
    config: Any  # pipeline.RunConfig
    writer: Any  # outputs.ResultsWriter
    multi_root: bool
    overlay_sink: Any = None
    map_sink: Any = None


class Engine(Protocol):
    """The interface :func:`~visbatch.core.pipeline.run_pipeline` calls."""

    said: str | None  # the summary's line on where the run ran (None: nothing to say)

    def start(self, run: EngineRun) -> dict:
        """Ready the run (called after the output is opened); returns the metadata's ``engine``."""

    def run(
        self, items: Sequence[Any], offset: int, commit: Callable[[Committed], None], stop: Callable[[], bool]
    ) -> None:
        """Map ``items`` (numbered from ``offset``): every batch written to the output is passed
        to ``commit``; returns early once ``stop()`` is true."""

    def finish(self, commit: Callable[[Committed], None]) -> None:
        """Commit whatever is still in flight (at the end, or after a stop)."""

    def decode(self, items: Sequence[Any], model: Any, config: Any) -> Iterable[Any]:
        """The decode stage alone, as collated batches in item order (quantize's calibration)."""


def open_engine(options: EngineOptions | None) -> Engine:
    """The chosen engine, connected (a cluster joined) before any output is created."""
    name = options.name if options is not None else "local"
    return importlib.import_module(ENGINE_MODULES[name]).open_engine(options or EngineOptions())


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
        if name not in ENGINE_MODULES:
            raise UsageError(f"--engine {name!r}: choose {' or '.join(ENGINE_MODULES)}")
        # The Ray settings are checked whatever the engine: a typo is said now, not when the
        # same command line later runs on a cluster.
        parsed = parse_concurrency(concurrency)
        if gpus_per_worker is not None and not gpus_per_worker >= 0:
            raise UsageError(f"--gpus-per-worker {gpus_per_worker}: give a number >= 0")
        if name == "local":
            return cls()
        if name == "ray" and (importlib.util.find_spec("ray") is None or importlib.util.find_spec("pandas") is None):
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
