"""`visbatch select-data`: dedup, filter and choose a subset within a budget, with a manifest."""

import json
import sys
from typing import Optional

import typer

from visbatch.cli.common import UsageError, find_inputs, finish, guarded, job_command, load_model_for, pipeline_config


@job_command(default_model="efficientnet-lite0")
def select_data(
    common,
    budget: Optional[str] = typer.Option(
        None, "--budget", help="Fraction of the pool (with a point: 0.3) or a count (10000). Default: all kept."
    ),
    strategy: str = typer.Option(
        "random", "--strategy", help="random, top-clip-score, kcenter, cluster-balanced or targeted."
    ),
    seed: int = typer.Option(0, "--seed"),
    reference: Optional[str] = typer.Option(None, "--reference", help="Folder of examples to match (targeted)."),
    cache: Optional[str] = typer.Option(
        None,
        "--cache",
        help="Embedding cache (default OUTPUT.embeddings.parquet); a clip-score --save-embeddings output works too.",
    ),
    clusters: Optional[int] = typer.Option(None, "--clusters", min=1, help="k-means clusters (default sqrt(pool))."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Skip near-duplicate removal."),
    mirror: bool = typer.Option(
        True,
        "--mirror/--no-mirror",
        help="Dedup also matches mirrored copies (each image is embedded flipped left-right too, in the same batch).",
    ),
    dedup_threshold: Optional[float] = typer.Option(
        None,
        "--dedup-threshold",
        min=-1.0,
        max=1.0,
        help="Cosine above which two images are near duplicates (default 0.95 for CLIP, 0.85 for classifiers).",
    ),
    dedup_keep: str = typer.Option("centroid", "--dedup-keep", help="centroid or clip-score."),
    min_clip_score: Optional[float] = typer.Option(None, "--min-clip-score", help="Drop pairs below this CLIP-S."),
    clip_score_fraction: Optional[float] = typer.Option(
        None, "--clip-score-fraction", min=0.0, max=1.0, help="Keep this fraction by CLIP-S (global threshold)."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Score every image against this text."),
    captions: Optional[str] = typer.Option(None, "--captions", help="Captions table for the CLIP-score filter."),
    sidecar: bool = typer.Option(False, "--sidecar", help="Captions from image.txt / image.json ('caption')."),
    path_column: str = typer.Option("path", "--path-column"),
    caption_column: str = typer.Option("caption", "--caption-column"),
    copy_to_option: Optional[str] = typer.Option(
        None, "--copy-to", help="Copy the selection here, keeping relative paths."
    ),
    link_to_option: Optional[str] = typer.Option(None, "--link-to", help="Link the selection here (see --link)."),
    link: str = typer.Option("symlink", "--link", help="symlink or hardlink, for --link-to."),
    shards_option: Optional[str] = typer.Option(
        None,
        "--write-shards",
        help="Write the selected samples, with their .txt/.json sidecars, as WebDataset tar shards in this "
        "folder (000000.tar, 000001.tar, ...).",
    ),
    shard_size: int = typer.Option(10000, "--shard-size", min=1, help="Samples per shard with --write-shards."),
    print_selected: bool = typer.Option(False, "--print-selected", help="Write selected paths to stdout."),
):
    """Drop exact and near duplicates and off-caption images, then fill a budget; the manifest says why."""
    from visbatch.core.images import display_path
    from visbatch.core.pipeline import check_creatable, check_folder_path, json_safe
    from visbatch.core.plan import InputSet, as_local
    from visbatch.core.sources import SourceOptions, find_images, is_url
    from visbatch.core.tasks.select import (
        STRATEGIES,
        SelectOptions,
        materialize,
        parse_budget,
        plan_materialize,
        run_select,
    )
    from visbatch.core.tasks.select.reshard import check_shard_folder, plan_shards
    from visbatch.core.tasks.select.reshard import write_shards as write_shards_to
    from visbatch.core.texts import TextTable

    def job() -> int:
        if strategy not in STRATEGIES:
            raise UsageError(f"--strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
        if dedup_keep not in ("centroid", "clip-score"):
            raise UsageError("--dedup-keep must be centroid or clip-score")
        if link not in ("symlink", "hardlink"):
            raise UsageError("--link must be symlink or hardlink")
        if min_clip_score is not None and clip_score_fraction is not None:
            raise UsageError("give --min-clip-score or --clip-score-fraction, not both")
        if sum([prompt is not None, bool(captions), sidecar]) > 1:
            raise UsageError("choose one caption source: --prompt, --captions or --sidecar")
        if "reference" in STRATEGIES[strategy].needs and not reference:
            raise UsageError(f"--strategy {strategy} needs --reference DIR")
        if print_selected and common.json:
            raise UsageError("--print-selected and --json both write to stdout; choose one")
        if common.resume:
            raise UsageError("select-data reuses its embedding cache instead of --resume; run it again")
        copy_to, link_to, write_shards = as_local(copy_to_option), as_local(link_to_option), as_local(shards_option)
        for target, option in ((copy_to, "--copy-to"), (link_to, "--link-to"), (write_shards, "--write-shards")):
            if target and is_url(target):
                raise UsageError(f"{option} needs a local folder (upload the files with your storage's tools)")
        budget_value = parse_budget(budget)
        items = find_inputs(common, caption_column)
        roots = sorted({it.root for it in items})
        reference_reads = InputSet()
        reference_items = (
            find_images([reference], SourceOptions(recursive=common.recursive), reads=reference_reads)
            if reference
            else []
        )
        if reference and not reference_items:
            raise UsageError(f"no images in --reference {reference}")
        model = load_model_for(common)
        config = pipeline_config(common, "select-data", model, items, files=[captions])
        config.plan.inputs.merge(reference_reads)
        # Every destination in the plan; the checks that can refuse them run after the plan's own
        # check and before anything is embedded: a refused run leaves nothing behind.
        everything = [True] * len(items)
        for target, option in ((copy_to, "--copy-to"), (link_to, "--link-to"), (write_shards, "--write-shards")):
            config.plan.write_folder(target, f"{option} folder")

        def destinations_free() -> None:
            for target, mode, option in ((copy_to, "copy", "--copy-to"), (link_to, link, "--link-to")):
                if target:
                    check_folder_path(target, f"{option} folder")
                    plan_materialize(items, everything, target, mode, common.overwrite)
                    check_creatable(target, f"{option} folder")
            if write_shards:
                check_folder_path(write_shards, "--write-shards folder")
                check_shard_folder(write_shards, shard_size, common.overwrite)
                check_creatable(write_shards, "--write-shards folder")

        options = SelectOptions(
            budget=budget_value,
            strategy=strategy,
            seed=seed,
            clusters=clusters,
            dedup=not no_dedup,
            mirror=mirror,
            dedup_threshold=dedup_threshold,
            dedup_keep=dedup_keep,
            min_clip_score=min_clip_score,
            clip_score_fraction=clip_score_fraction,
            prompt=prompt,
            captions=TextTable.read(captions, path_column, caption_column, roots) if captions else None,
            sidecar=sidecar,
            reference=reference_items,
            cache=cache,
        )
        resharded: dict = {}

        def shards_before_the_manifest(selection):
            if not write_shards:
                return None
            plan = plan_shards(items, selection.rank >= 0, write_shards, shard_size, common.overwrite)
            written = write_shards_to(plan)
            placed = written.pop("placed")
            resharded.update(written)
            where = [placed.get(item.relpath, (None, None)) for item in items]
            return {"written_shard": [w[0] for w in where], "written_key": [w[1] for w in where]}

        def copies_after_the_manifest(selection):
            done = {}
            for target, mode in ((copy_to, "copy"), (link_to, link)):
                if target:
                    planned = plan_materialize(items, selection.rank >= 0, target, mode, common.overwrite)
                    done[f"materialized_{planned.mode}"] = materialize(planned)
            return done

        summary, selection = run_select(
            items,
            model,
            options,
            config,
            before_write=shards_before_the_manifest,
            after_write=copies_after_the_manifest,
            checks=destinations_free,
        )
        if resharded:
            summary.task_summary["write_shards"] = {"folder": write_shards, **resharded}
            if resharded["unreadable_count"]:
                summary.warnings.append(
                    f"--write-shards: {resharded['unreadable_count']} selected samples could not be read again "
                    f"and were left out (e.g. {resharded['unreadable'][0]})"
                )
            if resharded["other_tar_files_in_folder"]:
                summary.warnings.append(
                    f"--write-shards {write_shards} also holds older .tar files visbatch did not write this run "
                    f"(e.g. {resharded['other_tar_files_in_folder'][0]}); they were left as they are"
                )
        if print_selected:
            order = sorted((int(selection.rank[i]), item) for i, item in enumerate(items) if selection.rank[i] >= 0)
            for _, item in order:
                print(display_path(item.path if len(roots) > 1 else item.relpath))
        code = finish(summary, common)
        if not common.quiet:
            print(
                "  selection vs random subset of the same size:\n    "
                + json.dumps(json_safe(summary.task_summary.get("comparison", {}))),
                file=sys.stderr,
            )
        return code

    raise typer.Exit(guarded(job, common.quiet))
