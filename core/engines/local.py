"""``--engine local``: decode workers of this process feed the model, batch after batch.

While a batch runs on the model, the previous one's overlays and maps are written in
the sinks' threads; its rows are committed to the output once those files exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from visbatch.core.batches import (
    OverlayLook,
    PendingBatch,
    batch_tally,
    make_loader,
    observe,
    process_batch,
    settle,
    summary_rows,
)
from visbatch.core.engines import Committed, EngineOptions, EngineRun
from visbatch.core.images import ImageItem


class LocalEngine:
    said = None

    def __init__(self) -> None:
        self._run: EngineRun | None = None
        self._look: OverlayLook | None = None
        self._pending: PendingBatch | None = None  # mapped, its files being written

    def start(self, run: EngineRun) -> dict:
        self._run, self._look = run, OverlayLook.of(run.config)
        return {"engine": "local"}

    def run(
        self, items: Sequence[ImageItem], offset: int, commit: Callable[[Committed], None], stop: Callable[[], bool]
    ) -> None:
        run = self._run
        assert run is not None and self._look is not None, "start() first"
        loader = make_loader(
            items,
            run.model,
            run.config,
            display_size=run.config.overlay_size if run.overlay_sink else None,
            annotate=getattr(run.task, "annotate", None),
            geometry=getattr(run.task, "geometry", None),
        )
        for batch in loader:
            current = process_batch(
                run.task, run.model, batch, run.overlay_sink, run.map_sink, self._look, run.multi_root
            )
            self.finish(commit)
            self._pending = current
            if stop():
                return

    def finish(self, commit: Callable[[Committed], None]) -> None:
        """Wait for the held batch's files, write its rows, count them."""
        if self._pending is None or self._run is None:
            return
        rows = settle(self._pending)
        self._pending = None
        self._run.writer.write_rows(rows)
        commit(Committed(*batch_tally(rows)))
        observe(self._run.task, summary_rows(self._run.task, rows))

    def decode(self, items: Sequence[ImageItem], model, config):
        return make_loader(items, model, config)


def open_engine(options: EngineOptions) -> LocalEngine:
    return LocalEngine()
