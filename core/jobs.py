"""One runner for the jobs whose result is a file of their own, not a pipeline table.

``quantize`` (a quantized model file and its report) and ``detect-aigi train`` /
``eval`` (a detector file, an evaluation table) run a map stage through the
pipeline and a reduce on the driver (their ``command`` modules in
``core/tasks``). What they share is the order of the checks, which this module
keeps in one place:

1. every output is named, checked against the inputs and for an existing file
   (``--overwrite``), and its folder checked writable, **before** anything is
   created (a refused run leaves nothing behind);
2. the main output is locked for the whole job (a second run on it is told who
   holds it);
3. the job runs; what it writes goes through :mod:`visbatch.core.files`
   (atomic, umask-honouring).

The CLI builds a request from its options, calls the command, and prints what
the command returns: it holds no orchestration of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from visbatch.core.errors import UsageError
from visbatch.core.files import OutputLock
from visbatch.core.pipeline import check_creatable
from visbatch.core.protect import ProtectedInputs

T = TypeVar("T")


@dataclass(frozen=True)
class JobOutput:
    """A file the job writes: its path and how messages name it (``output``, ``report``)."""

    path: str
    what: str = "output"


def check_job_outputs(outputs: Sequence[JobOutput], protected: ProtectedInputs, overwrite: bool) -> None:
    """Refuse (before anything is created) an output that exists without ``--overwrite``, that is
    or would replace an input, or whose folder cannot be written."""
    for output in outputs:
        if os.path.isdir(output.path):
            raise UsageError(f"{output.what} {output.path} is a folder; give a file path")
        if os.path.exists(output.path) and not overwrite:
            raise UsageError(f"{output.what} {output.path} exists; pass --overwrite to replace it")
        protected.check_file(output.path, output.what)
    for output in outputs:
        check_creatable(output.path, output.what)


def run_job(outputs: Sequence[JobOutput], protected: ProtectedInputs, overwrite: bool, body: Callable[[], T]) -> T:
    """Check every output, then run ``body`` holding the lock of the first (the main output)."""
    check_job_outputs(outputs, protected, overwrite)
    with OutputLock(outputs[0].path):
        return body()
