"""`visbatch clip-score`: CLIPScore, RefCLIPScore, zero-shot labels, embeddings."""

import sys
from typing import Optional

import typer

from visbatch.cli.common import (
    UsageError,
    find_inputs,
    finish,
    guarded,
    job_command,
    load_model_for,
    pipeline_config,
    read_labels,
)


@job_command(default_model="ViT-B-32", default_pretrained="laion2b_s34b_b79k")
def clip_score(
    common,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One text for every image."),
    captions: Optional[str] = typer.Option(
        None, "--captions", help="CSV/TSV/JSONL/Parquet with a path and a caption column."
    ),
    path_column: str = typer.Option("path", "--path-column", help="Path column of --captions/--references."),
    caption_column: str = typer.Option("caption", "--caption-column", help="Caption column of --captions."),
    sidecar: bool = typer.Option(False, "--sidecar", help="Captions from image.txt or image.json ('caption')."),
    references: Optional[str] = typer.Option(
        None, "--references", help="Reference captions (path + reference columns; several rows per image allowed)."
    ),
    reference_column: str = typer.Option("reference", "--reference-column", help="Text column of --references."),
    prefix: str = typer.Option("", "--prefix", help="Prepended to every caption (the paper used 'A photo depicts ')."),
    weight: float = typer.Option(2.5, "--weight", help="w in CLIP-S = w * max(cos, 0)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Zero-shot labels, comma-separated."),
    labels_file: Optional[str] = typer.Option(None, "--labels-file", help="Zero-shot labels, one per line."),
    template: Optional[list[str]] = typer.Option(
        None, "--template", help="Prompt template with {} (repeatable: an ensemble). Default 'a photo of a {}.'"
    ),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Zero-shot labels to report per image."),
    save_probs: bool = typer.Option(False, "--save-probs", help="Also store the full label probability vector."),
    save_embeddings: bool = typer.Option(
        False, "--save-embeddings", help="Store normalized float16 image (and text) embeddings."
    ),
    save_mirrored: bool = typer.Option(
        False,
        "--save-mirrored",
        help="With --save-embeddings, also the embedding of each image mirrored "
        "left-right (column image_embedding_flipped), so the table serves as a cache for select-data's "
        "mirror-invariant dedup.",
    ),
    text_batch_size: int = typer.Option(256, "--text-batch-size", min=1, help="Texts per text-tower batch."),
):
    """Score how well each image matches its caption (CLIPScore), label images zero-shot, save embeddings."""
    from visbatch.core.pipeline import run_pipeline
    from visbatch.core.tasks.clip_score import ClipScoreOptions, ClipScoreTask
    from visbatch.core.texts import DEFAULT_TEMPLATE, TextTable, check_template

    def job() -> int:
        if save_mirrored and not save_embeddings:
            raise UsageError("--save-mirrored needs --save-embeddings")
        label_names = read_labels(labels, labels_file)
        templates = list(template or [DEFAULT_TEMPLATE])
        for t in templates:
            check_template(t)
        if prompt is not None and not prompt.strip():
            raise UsageError("--prompt is empty")
        items = find_inputs(common, caption_column, stream=True)
        roots = items.roots
        caption_table = TextTable.read(captions, path_column, caption_column, roots) if captions else None
        reference_table = TextTable.read(references, path_column, reference_column, roots) if references else None
        model = load_model_for(common)
        wants_text = prompt is not None or captions or sidecar or label_names or references
        if wants_text and "text_embedding" not in model.capabilities:
            raise UsageError(f"clip-score needs a CLIP model with a text tower; {model.spec} has none")
        options = ClipScoreOptions(
            prompt=prompt,
            captions=caption_table,
            sidecar=sidecar,
            references=reference_table,
            prefix=prefix,
            weight=weight,
            labels=label_names,
            templates=templates,
            top_k=top_k,
            save_probs=save_probs,
            save_embeddings=save_embeddings,
            save_flipped=save_mirrored,
            text_batch_size=text_batch_size,
        )
        task = ClipScoreTask(model, options)
        for name, table in (("--captions", caption_table), ("--references", reference_table)):
            if table is not None and table.orphans and not common.quiet:
                print(
                    f"visbatch: warning: {len(table.orphans)} rows of {name} name images that do not exist "
                    f"(e.g. {table.orphans[0]})",
                    file=sys.stderr,
                )
        summary = run_pipeline(
            task,
            model,
            items,
            pipeline_config(common, "clip-score", model, items, files=[captions, references, labels_file]),
        )
        return finish(summary, common)

    raise typer.Exit(guarded(job, common.quiet))
