"""Every CUDA measurement of bench/ in one run, sized to finish in under 8 minutes on one GPU.

Time on a lent GPU machine is short (about 15 minutes a session, starts
included), so this script is prepared and dry-run on CPU first
(``--dry-run`` runs the same steps at toy sizes on the CPU) and then run
once on the GPU. Each step is a bench/ script run as a subprocess with its
own time limit; a step that fails or runs out of time is reported as such
and the others still run. At the end it prints the Markdown rows for
docs/benchmarks.md (device, command and date are printed with them) and
writes them to ``--out`` (default ``$OUT/gpu_check.md`` when ``$OUT`` is
set, else ``gpu_check.md``).

On the GPU machine (open_clip_torch and ftfy carried as wheels, see the
device notes in docs/benchmarks.md):

    pip install --no-deps -e . && python bench/gpu_check.py

Steps: pipeline throughput (classify), clip-score against torchmetrics (when
installed), saliency methods against Captum/grad-cam (when installed),
quantize (RTN/AWQ/GPTQ files and their throughput), the packed-kernel
microbenchmark (``torch._weight_int4pack_mm`` on CUDA), detect-aigi scoring, select-data at 100k and 1M embeddings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (name, script arguments on the GPU, arguments for --dry-run on CPU, time limit in s on the GPU)
STEPS = [
    (
        "pipeline",
        ["pipeline.py", "--images", "2048", "--batch-size", "64", "--device", "cuda", "--json"],
        ["pipeline.py", "--images", "16", "--batch-size", "8", "--device", "cpu", "--workers", "0", "--json"],
        90,
    ),
    (
        "clip-score",
        ["clip_score.py", "--images", "1024", "--batch-size", "128", "--device", "cuda", "--json"],
        ["clip_score.py", "--images", "8", "--batch-size", "8", "--device", "cpu", "--workers", "0", "--json"],
        90,
    ),
    (
        "saliency",
        ["saliency.py", "--images", "128", "--batch-size", "32", "--device", "cuda", "--json"],
        [
            "saliency.py",
            "--images",
            "4",
            "--batch-size",
            "4",
            "--steps",
            "4",
            "--samples",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--json",
        ],
        120,
    ),
    (
        "quantize",
        ["quantize.py", "--images", "64", "--batch-size", "32", "--device", "cuda", "--json"],
        ["quantize.py", "--images", "8", "--batch-size", "8", "--device", "cpu", "--json"],
        90,
    ),
    (
        "quant-kernels",
        ["quant_kernels.py", "--device", "cuda", "--repeats", "20"],
        ["quant_kernels.py", "--device", "cpu", "--repeats", "1"],
        45,
    ),
    (
        "detect-aigi",
        ["detect_aigi.py", "--images", "512", "--batch-size", "64", "--workers", "8", "--device", "cuda"],
        ["detect_aigi.py", "--images", "8", "--batch-size", "8", "--device", "cpu"],
        60,
    ),
    (
        "select-data",
        ["select_data.py", "--sizes", "100000", "1000000", "--device", "cuda", "--json"],
        ["select_data.py", "--sizes", "2000", "--device", "cpu", "--json"],
        60,
    ),
]
BUDGET_S = 8 * 60


def run_step(name: str, argv: list[str], limit: float) -> dict:
    command = [sys.executable, str(REPO / "bench" / argv[0]), *argv[1:]]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=REPO)
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {limit:.0f} s"
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    tail = [line for line in (stderr or "").strip().splitlines() if line][-1:]
    return {
        "step": name,
        "status": status,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python bench/" + " ".join(shlex.quote(a) for a in argv),
        "rows": rows,
        "text": stdout if not rows else "",
        "last_error": tail[0] if tail and status != "ok" else None,
    }


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory = f"{props.total_memory / 2**30:.0f} GiB"
        return f"{props.name}, {memory}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def markdown(results: list[dict], device: str) -> str:
    lines = [f"### gpu_check: {device}, {dt.date.today().isoformat()}", "", "`python bench/gpu_check.py`", ""]
    for result in results:
        lines.append(f"#### {result['step']} ({result['status']}, {result['seconds']} s)")
        lines.append("")
        lines.append(f"`{result['command']}`")
        lines.append("")
        if result["rows"]:
            keys = list(dict.fromkeys(k for row in result["rows"] for k in row))
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for row in result["rows"]:
                cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
                lines.append("| " + " | ".join(cells) + " |")
        elif result["text"].strip():
            lines += ["```", result["text"].strip()[-3000:], "```"]
        if result["last_error"]:
            lines.append(f"last error line: `{result['last_error']}`")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="the same steps at toy sizes on the CPU")
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device (use --dry-run to rehearse on the CPU)")
    deadline = time.perf_counter() + BUDGET_S
    results = []
    for name, gpu_argv, cpu_argv, limit in STEPS:
        if args.only and name not in args.only:
            continue
        left = deadline - time.perf_counter()
        if left < 10:
            results.append(
                {
                    "step": name,
                    "status": "skipped: the 8-minute budget is spent",
                    "seconds": 0,
                    "command": "",
                    "rows": [],
                    "text": "",
                    "last_error": None,
                }
            )
            continue
        result = run_step(name, cpu_argv if args.dry_run else gpu_argv, min(limit * (4 if args.dry_run else 1), left))
        print(f"gpu_check: {name}: {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)
        results.append(result)
    text = markdown(results, device_line())
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else "gpu_check.md"))
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
