"""Options every subcommand shares, defined once, and the code that runs a job.

:func:`job_command` adds the common options (README, "Common options") to a
command function and hands it a :class:`CommonOptions`; :func:`find_inputs`,
:func:`load_model_for` and :func:`pipeline_config` turn those into items, a
model and a run configuration; :func:`finish` prints the summary and
chooses the exit code. :func:`guarded` turns every error into one line on
stderr and an exit code (:data:`EXIT_*`).
"""

import contextlib
import functools
import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from visbatch.core.errors import UsageError, VisbatchError

EXIT_OK = 0
EXIT_SOME_FAILED = 1  # images failed and --fail-on-error was set, or a gate failed
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_INTERRUPTED = 130

# Bounds that no machine reaches, so a typo is a usage error rather than a fork bomb or an overflow.
MAX_BATCH_SIZE = 1 << 16
MAX_WORKERS = 256


@dataclass
class CommonOptions:
    inputs: list
    manifest: Optional[str]
    model: str
    pretrained: Optional[str]
    device: str
    precision: str
    batch_size: Optional[int]
    workers: Optional[int]
    recursive: bool
    glob: list
    limit: Optional[int]
    shard: Optional[str]
    max_pixels: int
    resume: bool
    overwrite: bool
    fail_on_error: bool
    json: bool
    quiet: bool
    output: Optional[str]
    runtime: str = "speed"
    image_column: Optional[str] = None
    keep_columns: Optional[str] = None
    hash: str = "blake2b"
    engine: str = "local"
    ray_address: str = "auto"
    gpus_per_worker: Optional[float] = None
    concurrency: Optional[str] = None
    report: bool = False
    warnings: list = field(default_factory=list)  # what the inputs' reading skipped, for the summary
    reads: Optional[object] = None  # the InputSet of what the inputs read (find_inputs fills it)


# --engine and its settings: shared by CommonOptions and the jobs whose result is a file.
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="local (this machine) or ray (a Ray cluster; pip install 'visbatch\\[ray]').",
        envvar="VISBATCH_ENGINE",
    ),
]

RayAddressOpt = Annotated[
    str,
    typer.Option(
        "--ray-address",
        help="With --engine ray: auto (the running cluster, else a local one), local, or HOST:PORT.",
        envvar="VISBATCH_RAY_ADDRESS",
    ),
]

GpusPerWorkerOpt = Annotated[
    Optional[float],
    typer.Option(
        "--gpus-per-worker",
        min=0.0,
        help="With --engine ray: GPUs per model actor (default 1 when the cluster has GPUs, else 0).",
        envvar="VISBATCH_GPUS_PER_WORKER",
        show_default=False,
    ),
]

ConcurrencyOpt = Annotated[
    Optional[str],
    typer.Option(
        "--concurrency",
        help="With --engine ray: model actors, N or MIN,MAX (default: one per GPU, or 1 on CPU).",
        envvar="VISBATCH_CONCURRENCY",
        show_default=False,
    ),
]


def _common_parameters(default_model: str, default_pretrained: Optional[str]) -> list:
    P = inspect.Parameter
    kw = P.KEYWORD_ONLY

    def opt(name, annotation, default):
        return P(name, kw, default=default, annotation=annotation)

    return [
        P(
            "inputs",
            P.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=Annotated[
                Optional[list[str]],
                typer.Argument(
                    help="Image folders or files, - (paths on stdin), WebDataset tar shards (x.tar, "
                    "'pool/{00000..00099}.tar', a folder of .tar, a .txt listing shards), Parquet/Arrow tables "
                    "of images, or any of these as a URL (s3://, gs://, file://).",
                    show_default=False,
                ),
            ],
        ),
        opt(
            "manifest",
            Annotated[
                Optional[str],
                typer.Option(
                    "--manifest",
                    help="CSV/TSV/JSONL/Parquet file with a `path` column (paths relative to it).",
                    envvar="VISBATCH_MANIFEST",
                ),
            ],
            None,
        ),
        opt(
            "model",
            Annotated[
                str,
                typer.Option(
                    "--model",
                    "-m",
                    help="Model spec: efficientnet-lite0, an open_clip name, timm:NAME, hf-hub:ORG/NAME.",
                    envvar="VISBATCH_MODEL",
                ),
            ],
            default_model,
        ),
        opt(
            "pretrained",
            Annotated[
                Optional[str],
                typer.Option(
                    "--pretrained",
                    help="open_clip tag, or a local weights file (safetensors, or .pt/.bin loaded weights-only)."
                    + (f" Default with the default model: {default_pretrained}." if default_pretrained else ""),
                    envvar="VISBATCH_PRETRAINED",
                    show_default=False,
                ),
            ],
            None,
        ),
        opt(
            "device",
            Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", envvar="VISBATCH_DEVICE")],
            "auto",
        ),
        opt(
            "precision",
            Annotated[
                str,
                typer.Option(
                    "--precision",
                    help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.",
                    envvar="VISBATCH_PRECISION",
                ),
            ],
            "auto",
        ),
        opt(
            "runtime",
            Annotated[
                str,
                typer.Option(
                    "--runtime",
                    help="For a quantized --model FILE: speed keeps each dequantized weight (as fast as "
                    "the original, memory as the original); memory dequantizes per batch (packed size in memory).",
                    envvar="VISBATCH_RUNTIME",
                ),
            ],
            "speed",
        ),
        opt(
            "batch_size",
            Annotated[
                Optional[int],
                typer.Option(
                    "--batch-size",
                    "-b",
                    min=1,
                    max=MAX_BATCH_SIZE,
                    help="Images per batch (default: 64 on CUDA, 8 on CPU, where small batches stay in cache).",
                    envvar="VISBATCH_BATCH_SIZE",
                    show_default=False,
                ),
            ],
            None,
        ),
        opt(
            "workers",
            Annotated[
                Optional[int],
                typer.Option(
                    "--workers",
                    "-j",
                    min=0,
                    max=MAX_WORKERS,
                    help="Decode worker processes (0 decodes in the main process). Default: "
                    "CPU count (at most 8) on CUDA; a quarter of the cores on CPU, where the model needs them.",
                    envvar="VISBATCH_WORKERS",
                    show_default=False,
                ),
            ],
            None,
        ),
        opt(
            "recursive",
            Annotated[
                bool,
                typer.Option(
                    "--recursive/--no-recursive", help="Walk folders recursively.", envvar="VISBATCH_RECURSIVE"
                ),
            ],
            True,
        ),
        opt(
            "glob",
            Annotated[
                Optional[list[str]],
                typer.Option(
                    "--glob",
                    help="Include pattern (repeatable); '!PATTERN' excludes. No '/' matches the file name.",
                    envvar="VISBATCH_GLOB",
                ),
            ],
            None,
        ),
        opt(
            "limit",
            Annotated[
                Optional[int],
                typer.Option(
                    "--limit",
                    min=1,
                    help="Process only the first N images (after sorting and sharding).",
                    envvar="VISBATCH_LIMIT",
                ),
            ],
            None,
        ),
        opt(
            "shard",
            Annotated[
                Optional[str],
                typer.Option(
                    "--shard",
                    help="I/N: process part I (0-based) of N, split by a stable hash of the relative path "
                    "(of the shard's name for tar shards: a whole tar is the unit).",
                    envvar="VISBATCH_SHARD",
                ),
            ],
            None,
        ),
        opt(
            "max_pixels",
            Annotated[
                int,
                typer.Option(
                    "--max-pixels",
                    min=0,
                    help="Refuse images with more pixels (decompression-bomb guard); 0 = no limit.",
                    envvar="VISBATCH_MAX_PIXELS",
                ),
            ],
            89_478_485,
        ),
        opt(
            "resume",
            Annotated[
                bool,
                typer.Option(
                    "--resume",
                    help="Continue an interrupted run (or add new images to a finished output).",
                    envvar="VISBATCH_RESUME",
                ),
            ],
            False,
        ),
        opt(
            "overwrite",
            Annotated[
                bool, typer.Option("--overwrite", help="Replace an existing output.", envvar="VISBATCH_OVERWRITE")
            ],
            False,
        ),
        opt(
            "fail_on_error",
            Annotated[
                bool,
                typer.Option("--fail-on-error", help="Exit 1 when any image failed.", envvar="VISBATCH_FAIL_ON_ERROR"),
            ],
            False,
        ),
        opt(
            "json",
            Annotated[
                bool, typer.Option("--json", help="Print a machine-readable summary to stdout.", envvar="VISBATCH_JSON")
            ],
            False,
        ),
        opt(
            "quiet",
            Annotated[
                bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.", envvar="VISBATCH_QUIET")
            ],
            False,
        ),
        opt(
            "image_column",
            Annotated[
                Optional[str],
                typer.Option(
                    "--image-column",
                    help="For Parquet/Arrow INPUT tables: the column holding each image (bytes, a "
                    "{bytes, path} struct as Hugging Face exports it, or a path/URL). Default: image.",
                    envvar="VISBATCH_IMAGE_COLUMN",
                ),
            ],
            None,
        ),
        opt(
            "keep_columns",
            Annotated[
                Optional[str],
                typer.Option(
                    "--keep-columns",
                    help="Comma-separated columns copied to the output rows: of INPUT tables (with their "
                    "types), or fields of each WebDataset sample's .json (as text; url, uid, ...).",
                    envvar="VISBATCH_KEEP_COLUMNS",
                ),
            ],
            None,
        ),
        opt(
            "hash",
            Annotated[
                str,
                typer.Option(
                    "--hash",
                    help="The content_hash column's algorithm: blake2b (128-bit, fast) or sha256 (as "
                    "img2dataset's sha256 column).",
                    envvar="VISBATCH_HASH",
                ),
            ],
            "blake2b",
        ),
        opt("engine", EngineOpt, "local"),
        opt("ray_address", RayAddressOpt, "auto"),
        opt("gpus_per_worker", GpusPerWorkerOpt, None),
        opt("concurrency", ConcurrencyOpt, None),
        opt(
            "report",
            Annotated[
                bool,
                typer.Option(
                    "--report",
                    help="Also write OUTPUT.html: the run's report (pip install 'visbatch\\[report]').",
                    envvar="VISBATCH_REPORT",
                ),
            ],
            False,
        ),
        opt(
            "output",
            Annotated[
                Optional[str],
                typer.Option(
                    "--output",
                    "-o",
                    help="Output Parquet file (default: TASK.parquet in the current folder).",
                    envvar="VISBATCH_OUTPUT",
                ),
            ],
            None,
        ),
    ]


COMMON_NAMES = [f for f in CommonOptions.__dataclass_fields__ if f not in ("warnings", "reads")]


@contextlib.contextmanager
def content_hash_algorithm(name: str):
    """``--hash``: the algorithm of every content hash this run computes, through the
    environment so decode workers and Ray workers compute the same (restored afterwards)."""
    from visbatch.core.sources.base import HASH_ALGORITHMS, HASH_ENV

    if name not in HASH_ALGORITHMS:
        raise UsageError(f"--hash must be one of {', '.join(HASH_ALGORITHMS)}, got {name!r}")
    before = os.environ.get(HASH_ENV)
    os.environ[HASH_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(HASH_ENV, None)
        else:
            os.environ[HASH_ENV] = before


def job_command(default_model: str, default_pretrained: Optional[str] = None) -> Callable:
    """Decorator: give a command the common options and pass them as ``common``."""

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "common"]

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            common = CommonOptions(**{name: kwargs.pop(name) for name in COMMON_NAMES})
            common.inputs = list(common.inputs or [])
            common.glob = list(common.glob or [])
            # The default weights go with the default model only.
            if common.pretrained is None and common.model == default_model:
                common.pretrained = default_pretrained
            from visbatch.core.sources.base import HASH_ALGORITHMS

            if common.hash not in HASH_ALGORITHMS:
                raise fail(f"--hash must be one of {', '.join(HASH_ALGORITHMS)}, got {common.hash!r}", EXIT_USAGE)
            with content_hash_algorithm(common.hash):
                return func(*args, common=common, **kwargs)

        params = _common_parameters(default_model, default_pretrained)
        positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        own_kw = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = signature.replace(parameters=positional + own_kw + keyword)
        del wrapper.__wrapped__  # typer must read the new signature, not the original
        return wrapper

    return decorate


class CheckedCommand(TyperCommand):
    """A subcommand whose number options are finite and fit 64 bits: ``--weight nan``, ``--alpha
    inf`` or ``--masks 1e30`` is a usage error (exit 2) before anything runs, whatever option it
    is (click accepts them all)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from visbatch.cli.panels import group

        group(self)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            from visbatch.cli.panels import HELP, plain_flags

            option.rich_help_panel = HELP  # type: ignore[attr-defined]
            plain_flags([option])
        return option

    def parse_args(self, ctx, args):
        rest = super().parse_args(ctx, args)
        for param in self.params:
            value = ctx.params.get(param.name or "")
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise _bad_parameter(f"must be a finite number, got {v}", ctx, param)
                if type(v) is int and abs(v) >= 1 << 63:
                    raise _bad_parameter(f"{v} is beyond any meaningful value", ctx, param)
        return rest


def _bad_parameter(message: str, ctx, param):
    try:  # typer >= 0.20 carries its own click
        from typer._click.exceptions import BadParameter
    except ImportError:  # pragma: no cover
        from click import BadParameter
    return BadParameter(message, ctx=ctx, param=param)


def fail(message: str, code: int) -> "typer.Exit":
    print(f"visbatch: error: {one_line(message)}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def one_line(message: str) -> str:
    """Error text on one line (the first line of a multi-line library message)."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def guarded(func: Callable[[], int], quiet: bool = False) -> int:
    """Run ``func`` and map every exception to one line on stderr and an exit code.

    visbatch's own errors carry their code (2 usage, 3 fatal); an interrupt is
    130 (silent with ``quiet``); anything else is a bug in visbatch, reported as
    ``internal error`` with exit 3 (``VISBATCH_DEBUG=1`` shows the traceback).
    """
    try:
        return func()
    except VisbatchError as exc:
        if exc.exit_code == EXIT_INTERRUPTED and quiet:
            raise typer.Exit(EXIT_INTERRUPTED)
        raise fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        if quiet:
            raise typer.Exit(EXIT_INTERRUPTED)
        raise fail("interrupted", EXIT_INTERRUPTED)
    except MemoryError:
        raise fail("out of memory; try a smaller --batch-size", EXIT_FATAL)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise fail(f"{exc.strerror or exc}{where}", EXIT_FATAL)
    except typer.Exit:
        raise
    except Exception as exc:
        if "out of memory" in str(exc).lower():
            raise fail("device out of memory even for a single image; try --precision bf16 or --device cpu", EXIT_FATAL)
        if os.environ.get("VISBATCH_DEBUG"):
            raise
        raise fail(
            f"internal error: {type(exc).__name__}: {one_line(str(exc))} "
            "(please report it; VISBATCH_DEBUG=1 shows where)",
            EXIT_FATAL,
        )


def input_settings(common: CommonOptions, caption_column: Optional[str] = None):
    """The common options' INPUT side, for core.prepare (warnings land in ``common.warnings``)."""
    from visbatch.core.prepare import InputSettings

    return InputSettings(
        inputs=common.inputs,
        manifest=common.manifest,
        recursive=common.recursive,
        globs=common.glob,
        limit=common.limit,
        shard=common.shard,
        image_column=common.image_column,
        keep_columns=common.keep_columns,
        caption_column=caption_column,
        warnings=common.warnings,
    )


def find_inputs(common: CommonOptions, caption_column: Optional[str] = None, stream: bool = False):
    """The run's items (:func:`visbatch.core.prepare.find_run_inputs`); ``common.reads`` gets what
    reading them reads."""
    from visbatch.core.prepare import find_run_inputs

    items, common.reads = find_run_inputs(input_settings(common, caption_column), stream)
    return items


def load_model_for(common: CommonOptions):
    from visbatch.core.models import load_model

    if common.runtime not in ("speed", "memory"):
        raise UsageError("--runtime must be speed or memory")
    return load_model(common.model, common.pretrained, common.device, common.precision, runtime=common.runtime)


def pipeline_config(common: CommonOptions, task_name: str, model, items, files=(), **overlay):
    """The run configuration (:func:`visbatch.core.prepare.prepare_run`): ``items`` and ``files``
    are what every output is checked against, in core, before anything is created."""
    from visbatch.core.prepare import OutputSettings, prepare_run

    out = OutputSettings(
        output=common.output,
        resume=common.resume,
        overwrite=common.overwrite,
        report=common.report,
        batch_size=common.batch_size,
        workers=common.workers,
        max_pixels=common.max_pixels,
        quiet=common.quiet,
        engine=engine_options(common),
    )
    reads = getattr(items, "reads", None) or common.reads
    read_files = [common.manifest, common.pretrained, common.model, *files]
    return prepare_run(task_name, model, input_settings(common), reads, out, read_files, **overlay)


def engine_options(common: CommonOptions):
    return parse_engine(common.engine, common.ray_address, common.gpus_per_worker, common.concurrency)


def parse_engine(engine: str, ray_address: str, gpus_per_worker: Optional[float], concurrency: Optional[str]):
    """The --engine options, checked (and the ray extra found) before anything is created."""
    from visbatch.core.engines import EngineOptions

    return EngineOptions.parse(engine, ray_address, gpus_per_worker, concurrency)


ReportOpt = Annotated[
    bool,
    typer.Option(
        "--report",
        help="Also write the result's report as HTML beside it (pip install 'visbatch\\[report]').",
        envvar="VISBATCH_REPORT",
    ),
]


def finish(summary, common: CommonOptions) -> int:
    """Print the summary (and write the --report) and choose the exit code."""
    from visbatch.core.pipeline import print_summary

    summary.warnings[:0] = common.warnings
    print_summary(summary, common.json, common.quiet)
    if summary.report and not common.quiet:
        print(f"  report: {summary.report}", file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.failed and common.fail_on_error:
        return EXIT_SOME_FAILED
    return EXIT_OK


# Overlay options shared by the commands that draw heatmaps.
OverlaysOpt = Annotated[
    Optional[str], typer.Option("--overlays", help="Folder for PNG overlays (mirrors the input folders).")
]
OverlaySizeOpt = Annotated[
    int, typer.Option("--overlay-size", min=16, help="Longer side of overlay images, in pixels.")
]
ColormapOpt = Annotated[str, typer.Option("--colormap", help="turbo, viridis, inferno, jet, gray or coolwarm.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity over the image.")]
OverlayStyleOpt = Annotated[str, typer.Option("--overlay-style", help="blend or side-by-side.")]


def overlay_settings(overlays, overlay_size, colormap, alpha, overlay_style) -> dict:
    from visbatch.core.overlays import COLORMAPS

    if colormap not in COLORMAPS:
        raise UsageError(f"--colormap {colormap!r}: choose from {', '.join(COLORMAPS)}")
    if overlay_style not in ("blend", "side-by-side"):
        raise UsageError(f"--overlay-style {overlay_style!r}: choose blend or side-by-side")
    return dict(
        overlays=overlays,
        overlay_size=overlay_size,
        overlay_colormap=colormap,
        overlay_alpha=alpha,
        overlay_style=overlay_style,
    )


# Options of the commands that do not take the job options (quantize, detect-aigi train/eval).
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", envvar="VISBATCH_DEVICE")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.", envvar="VISBATCH_PRECISION"
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH_SIZE, help="Images per batch.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, max=MAX_WORKERS, help="Decode worker processes.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the figures as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]


def read_labels(labels: Optional[str], labels_file: Optional[str]) -> Optional[list]:
    """Zero-shot label names from --labels (comma-separated) or --labels-file (one per line)."""
    if labels and labels_file:
        raise UsageError("give --labels or --labels-file, not both")
    if labels_file:
        try:
            with open(labels_file, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise UsageError(f"cannot read --labels-file {labels_file}: {exc.strerror or exc}")
    elif labels:
        names = [name.strip() for name in labels.split(",") if name.strip()]
    else:
        return None
    if len(names) < 2:
        raise UsageError("zero-shot labels need at least two labels")
    if len(set(names)) != len(names):
        raise UsageError("zero-shot labels repeat a name")
    return names
