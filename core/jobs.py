"""One runner for the jobs whose result is a file of their own, not a pipeline table.

``quantize`` (a quantized model file and its report), ``detect-aigi train`` /
``eval`` (a detector file, an evaluation table), ``merge`` and ``report`` run
through :func:`run_job`, which keeps the order of the checks in one place:

1. every output is declared in the run plan with what the job reads, and the
   plan is checked (no output equals, contains or lies inside an input, and no
   two outputs collide); each output is checked for an existing file
   (``--overwrite``) and a writable folder; all **before** anything is created
   (a refused run leaves nothing behind);
2. URL outputs get their local stand-ins (:mod:`visbatch.core.sinks`);
3. the main output is locked for the whole job (a second run on it is told who
   holds it);
4. the job runs inside the active plan, so every file it writes is admitted;
   URL outputs are uploaded whole when it has finished.

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
from visbatch.core.outputs import output_task
from visbatch.core.pipeline import check_creatable, check_output_name
from visbatch.core.plan import RunPlan, as_local, local_path_of
from visbatch.core.sinks import RemoteOutputs, check_url_output

T = TypeVar("T")


@dataclass
class JobOutput:
    """A file the job writes: its path (or URL), how messages name it (``output``, ``report``),
    ``replaces``: the task of a visbatch output that may be replaced without ``--overwrite`` (a
    side file that goes with the main output, such as quantize's report table; any other file
    there is refused), and ``target``, the local path the job writes it to (its staging copy for
    a URL)."""

    path: str
    what: str = "output"
    replaces: str | None = None
    local: str | None = None

    @property
    def target(self) -> str:
        return self.local or local_path_of(self.path) or self.path


def check_job_outputs(outputs: Sequence[JobOutput], overwrite: bool) -> None:
    """Refuse (before anything is created) an output that exists without ``--overwrite``, that is
    a folder, or whose folder cannot be written."""
    for output in outputs:
        local = local_path_of(output.path)
        if local is None:
            check_url_output(output.path, output.what)
            continue
        if local.endswith(os.sep) or os.path.isdir(local):
            raise UsageError(f"{output.what} {output.path} is a folder; give a file path")
        if os.path.exists(local) and not overwrite:
            if output.replaces is None or output_task(local) != output.replaces:
                raise UsageError(f"{output.what} {output.path} exists; pass --overwrite to replace it")
        check_creatable(local, output.what)


def plan_job(plan: RunPlan, outputs: Sequence[JobOutput], overwrite: bool) -> RunPlan:
    """Declare the outputs (the first one locked) and check the plan and the outputs."""
    for output in outputs:
        output.path = as_local(output.path) or output.path
        check_output_name(output.path, output.what)
    if not plan.checked:
        plan.write_locked_file(outputs[0].path, outputs[0].what)
        for output in outputs[1:]:
            plan.write_file(output.path, output.what)
        plan.check()
    check_job_outputs(outputs, overwrite)
    return plan


def run_job(plan: RunPlan, outputs: Sequence[JobOutput], overwrite: bool, body: Callable[[], T]) -> T:
    """Check the plan and every output, then run ``body`` inside the plan, holding the lock of the
    first output (the main one); ``body`` writes each output to its ``target``."""
    plan_job(plan, outputs, overwrite)
    with plan.activated():
        remote = RemoteOutputs()
        for output in outputs:
            if local_path_of(output.path) is None:
                output.local = remote.stage_file(output.path, overwrite=overwrite)
        with OutputLock(outputs[0].target):
            result = body()
        if remote:
            remote.publish()
    return result
