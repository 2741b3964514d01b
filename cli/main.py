"""The `visbatch` command: the Typer app and its subcommands."""

import sys

import typer

try:  # typer >= 0.20 carries its own click
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click

from visbatch.cli import detect_aigi
from visbatch.cli.classify import classify
from visbatch.cli.clip_score import clip_score
from visbatch.cli.common import CheckedCommand
from visbatch.cli.panels import PlainFlagsGroup
from visbatch.cli.quantize import quantize
from visbatch.cli.saliency import saliency
from visbatch.cli.select_data import select_data


class _OneLineErrors(PlainFlagsGroup):
    """The app's click group: option and usage errors become one line, ``visbatch: error: ...
    (see `visbatch CMD --help`)``, exit 2, instead of a multi-line box; an interrupt is exit 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from visbatch.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, one_line

        try:
            code = super().main(args, prog_name or "visbatch", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
            code = EXIT_USAGE if exc.ctx is not None and exc.ctx.parent is not None else 0
        except click.exceptions.UsageError as exc:
            path = exc.ctx.command_path.split(" ", 1) if exc.ctx is not None else []
            where = f"visbatch {path[1]} --help" if len(path) > 1 else "visbatch --help"
            print(f"visbatch: error: {one_line(exc.format_message())} (see `{where}`)", file=sys.stderr)
            code = EXIT_USAGE
        except click.exceptions.ClickException as exc:
            print(f"visbatch: error: {one_line(exc.format_message())}", file=sys.stderr)
            code = exc.exit_code
        except (KeyboardInterrupt, typer.Abort):
            print("visbatch: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        if standalone_mode:
            sys.exit(code or 0)
        return code


app = typer.Typer(
    name="visbatch",
    cls=_OneLineErrors,
    help="Batch vision-model jobs over image folders, written as Parquet tables and PNG overlays.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)
app.command("classify", cls=CheckedCommand)(classify)
app.command("clip-score", cls=CheckedCommand)(clip_score)
app.command("saliency", cls=CheckedCommand)(saliency)
app.command("select-data", cls=CheckedCommand)(select_data)
app.command("quantize", cls=CheckedCommand)(quantize)
app.add_typer(detect_aigi.app, name="detect-aigi")


def _version_callback(value: bool):
    if value:
        from visbatch.core import __version__

        print(f"visbatch {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
):
    """visbatch: batched saliency, CLIP scores, data selection, AI-image detection and quantization."""


@app.command("info", cls=CheckedCommand)
def info(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """Versions, devices, CUDA, and the models visbatch knows."""
    import json
    import platform

    import open_clip
    import torch

    from visbatch.core import __version__
    from visbatch.core.models import MODEL_REGISTRY

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    data = {
        "visbatch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "open_clip": open_clip.__version__,
        "models": {name: entry.description for name, entry in MODEL_REGISTRY.items()},
        "open_clip_models": len(open_clip.list_models()),
    }
    if as_json:
        print(json.dumps(data))
        return
    for key, value in data.items():
        if key == "models":
            print("models:")
            for name, text in value.items():
                print(f"  {name:20s} {text}")
            print("  timm:NAME            any timm model (weights via --pretrained PATH or timm's download)")
            print(
                f"  <open_clip name>     {data['open_clip_models']} open_clip architectures "
                "(python -c 'import open_clip; print(open_clip.list_models())')"
            )
        elif key != "open_clip_models":
            print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


@app.command("merge", cls=CheckedCommand)
def merge(
    parts: list[str] = typer.Argument(..., help="Parquet outputs of the same job's --shard I/N runs."),
    output: str = typer.Option(..., "--output", "-o", help="The merged Parquet file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Merge even if some shards are missing (a warning names them)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Nothing on stderr but errors."),
):
    """Merge the outputs of --shard runs of one job into one file, in sorted path order."""
    from visbatch.cli.common import EXIT_OK, guarded
    from visbatch.core.jobs import JobOutput, run_job
    from visbatch.core.merge import merge_outputs
    from visbatch.core.plan import RunPlan

    def job() -> int:
        plan = RunPlan()
        for part in parts:
            plan.inputs.add_path(part)
        warnings: list[str] = []
        outputs = [JobOutput(output, "merge output")]
        rows = run_job(
            plan,
            outputs,
            overwrite,
            lambda: merge_outputs(parts, outputs[0].target, True, allow_partial, warnings),
        )
        if not quiet:
            for warning in warnings:
                print(f"visbatch: warning: {warning}", file=sys.stderr)
            print(f"visbatch merge: {rows} rows from {len(parts)} parts into {output}", file=sys.stderr)
        return EXIT_OK

    raise typer.Exit(guarded(job, quiet))


@app.command("report", cls=CheckedCommand)
def report(
    results: list[str] = typer.Argument(..., help="visbatch outputs (several saliency runs: methods side by side)."),
    output: str = typer.Option("report.html", "--output", "-o", help="The HTML file (self-contained)."),
    max_images: int = typer.Option(120, "--max-images", min=0, help="Thumbnails in all the galleries together."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Nothing on stderr but errors."),
):
    """One self-contained HTML page of a run: its figures, galleries and errors."""
    from visbatch.cli.common import EXIT_OK, UsageError, guarded
    from visbatch.core.jobs import JobOutput, run_job
    from visbatch.core.plan import RunPlan

    def job() -> int:
        if not output.lower().endswith((".html", ".htm")):
            raise UsageError("-o must name an .html file")
        from visbatch.core.report import build_report, check_report_extra

        check_report_extra()
        from visbatch.core.report import report_inputs

        plan = RunPlan()
        for result in results:
            plan.inputs.add_path(result)
            for folder in report_inputs(result):  # the thumbnails come from the run's inputs and overlays
                plan.inputs.add_path(folder)
        outputs = [JobOutput(output, "report")]
        made = run_job(plan, outputs, overwrite, lambda: build_report(results, outputs[0].target, max_images))
        if not quiet:
            print(
                f"visbatch report: {made['images']} images, {made['bytes'] / 1e6:.2f} MB: {output}",
                file=sys.stderr,
            )
        return EXIT_OK

    raise typer.Exit(guarded(job, quiet))


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, `timeout`, `kill`) stops visbatch as Ctrl-C does: exit 130, outputs
    left resumable. Runs of the pipeline install their own, gentler handler while they run."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    import signal

    _stop_on_sigterm()
    try:
        app()
    finally:
        # The run has chosen its exit code and written what it will write. Python's shutdown
        # (which can take a second: threads, torch) resets its signal handlers to the defaults,
        # so a second SIGTERM then would end the process as 143 instead of the code it chose.
        # Ignored signals stay ignored through the shutdown (SIGKILL still ends one that hangs).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
