"""What the report shows for each kind of output: figures, galleries and tables.

Each builder takes the run (its table and metadata) and returns a list of sections, each
``{"title", "figures": [svg], "galleries": [{"title", "cards": [...]}], "tables": [...],
"notes": [...]}``. Histograms and counts use every row; galleries are samples bounded by
the report's ``--max-images``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visbatch.core.report import plots
from visbatch.core.report.thumbs import Thumbnails


@dataclass
class Run:
    path: str
    table: pa.Table
    metadata: dict
    thumbs: Thumbnails
    per_gallery: int

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist() if name in self.table.column_names else []

    def ok_rows(self) -> list[dict]:
        status = self.column("status")
        if not status:
            return self.table.to_pylist()
        mask = pa.array([s == "ok" for s in status])
        return self.table.filter(mask).to_pylist()


@dataclass
class Section:
    title: str
    figures: list[str] = field(default_factory=list)
    galleries: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _card(run: Run, row: dict, *lines: str, overlay: bool = False) -> dict:
    return {"src": run.thumbs.of(row, prefer_overlay=overlay), "title": row.get("path") or "", "lines": list(lines)}


def _gallery(title: str, cards: list[dict]) -> dict:
    return {"title": title, "cards": cards}


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEAVY_COLUMNS = ("map", "probs", "image_embedding", "text_embedding", "deletion_curve", "insertion_curve")


def _light_rows(run: Run, drop: tuple[str, ...] = HEAVY_COLUMNS) -> list[dict]:
    """The ok rows without their large list columns (a million rows stay cheap)."""
    keep = [c for c in run.table.column_names if c not in drop and not c.startswith("image_embedding")]
    table = run.table.select(keep)
    if "status" in keep:
        table = table.filter(pc.equal(table.column("status"), "ok"))
    return table.to_pylist()


# ----------------------------------------------------------------------------
# classify
# ----------------------------------------------------------------------------


def classify(run: Run) -> list[Section]:
    rows = _light_rows(run)
    top1 = [(r["top_labels"] or ["-"])[0] for r in rows]
    confidence = [(r["top_probs"] or [None])[0] for r in rows]
    counts = Counter(top1).most_common(15)
    section = Section("Classes")
    if counts:
        section.figures.append(plots.bars([c for c, _ in counts], [n for _, n in counts], "top-1 class (15 commonest)"))
    section.figures.append(plots.histogram(confidence, "top-1 probability", "probability"))
    for label, _ in counts[:4]:
        members = [r for r, t in zip(rows, top1) if t == label][: run.per_gallery]
        section.galleries.append(
            _gallery(f"top-1 {label}", [_card(run, r, f"p {_f(r['top_probs'][0])}") for r in members])
        )
    ranked = sorted((r for r in rows if r["top_probs"]), key=lambda r: r["top_probs"][0])[: run.per_gallery]
    section.galleries.append(
        _gallery(
            "lowest confidence",
            [_card(run, r, f"{r['top_labels'][0]} p {_f(r['top_probs'][0])}") for r in ranked],
        )
    )
    return [section]


# ----------------------------------------------------------------------------
# clip-score
# ----------------------------------------------------------------------------


def clip_score(run: Run) -> list[Section]:
    rows = _light_rows(run)
    sections = []
    scored = [r for r in rows if r.get("clip_score") is not None]
    if scored:
        s = Section("CLIPScore")
        s.figures.append(plots.histogram([r["clip_score"] for r in scored], "CLIP-S over all pairs", "CLIP-S"))
        if any(r.get("ref_clip_score") is not None for r in scored):
            s.figures.append(plots.histogram([r.get("ref_clip_score") for r in scored], "RefCLIP-S", "RefCLIP-S"))
        order = sorted(scored, key=lambda r: r["clip_score"])

        def card(r):
            lines = [f"CLIP-S {_f(r['clip_score'])}", (r.get("caption") or "")[:120]]
            if r.get("ref_clip_score") is not None:
                lines.insert(1, f"RefCLIP-S {_f(r['ref_clip_score'])}")
            return _card(run, r, *lines)

        s.galleries.append(_gallery("worst pairs", [card(r) for r in order[: run.per_gallery]]))
        s.galleries.append(_gallery("best pairs", [card(r) for r in order[::-1][: run.per_gallery]]))
        truncated = sum(bool(r.get("truncated")) for r in scored)
        s.notes.append(f"{truncated} of {len(scored)} captions were longer than the text tower's context (truncated)")
        sections.append(s)
    if rows and "top_labels" in rows[0]:
        z = Section("Zero-shot labels")
        top1 = Counter((r.get("top_labels") or ["-"])[0] for r in rows).most_common(15)
        z.figures.append(plots.bars([c for c, _ in top1], [n for _, n in top1], "top-1 label"))
        for label, _ in top1[:4]:
            members = [r for r in rows if (r.get("top_labels") or ["-"])[0] == label][: run.per_gallery]
            z.galleries.append(_gallery(label, [_card(run, r, f"p {_f(r['top_probs'][0])}") for r in members]))
        sections.append(z)
    return sections


# ----------------------------------------------------------------------------
# saliency
# ----------------------------------------------------------------------------


def _curve_matrix(run: Run, column: str) -> np.ndarray:
    """[ok rows with the curve, points] of a fixed-size list column, without Python lists per row."""
    if column not in run.table.column_names:
        return np.empty((0, 0))
    table = run.table
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "ok"))
    array = table.column(column).combine_chunks()
    array = array.filter(pc.is_valid(array))
    if not len(array) or not pa.types.is_fixed_size_list(array.type):
        return np.empty((0, 0))
    size = array.type.list_size
    flat = array.values.slice(array.offset * size, len(array) * size).to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float64).reshape(len(array), size)


def saliency(run: Run) -> list[Section]:
    rows = _light_rows(run)
    s = Section(f"Saliency: {run.metadata.get('task_options', {}).get('method', '')}")
    deletion, insertion = _curve_matrix(run, "deletion_curve"), _curve_matrix(run, "insertion_curve")
    if deletion.size:
        s.figures.append(
            plots.curve_band(
                {"deletion": deletion, "insertion": insertion},
                "deletion and insertion curves",
                "fraction of pixels deleted / inserted (most salient first)",
                "score of the explained target",
            )
        )
    for column, title in (
        ("target_score", "score of the explained target"),
        ("concentration", "concentration (share of attribution in the top 10% of the map)"),
        ("deletion_auc", "deletion AUC (lower is better)"),
        ("insertion_auc", "insertion AUC (higher is better)"),
    ):
        values = [r.get(column) for r in rows if r.get(column) is not None]
        if values:
            s.figures.append(plots.histogram(values, title, column))
    cards = [
        _card(
            run,
            r,
            f"{r.get('target') or ''} score {_f(r.get('target_score'))}",
            f"del {_f(r.get('deletion_auc'))} ins {_f(r.get('insertion_auc'))}",
            overlay=True,
        )
        for r in rows[: run.per_gallery * 2]
    ]
    s.galleries.append(_gallery("overlays", cards))
    return [s]


def saliency_side_by_side(runs: list[Run]) -> Section:
    """Methods of several saliency runs: their mean faithfulness, side by side."""
    s = Section("Methods side by side")
    table: dict[str, list] = {
        "head": ["run", "method", "images", "mean deletion AUC", "mean insertion AUC"],
        "rows": [],
    }
    for run in runs:
        method = run.metadata.get("task_options", {}).get("method", "?")
        rows = _light_rows(run)
        deletion = [r["deletion_auc"] for r in rows if r.get("deletion_auc") is not None]
        insertion = [r["insertion_auc"] for r in rows if r.get("insertion_auc") is not None]
        table["rows"].append(
            [
                run.path,
                method,
                len(rows),
                _f(float(np.mean(deletion))) if deletion else "-",
                _f(float(np.mean(insertion))) if insertion else "-",
            ]
        )
    s.tables.append(table)
    images = [set(p for p, st in zip(run.column("path"), run.column("status")) if st == "ok") for run in runs]
    if any(paths != images[0] for paths in images[1:]):
        s.notes.append(
            "the runs cover different images (" + ", ".join(str(len(p)) for p in images) + " ok): "
            "their means are not over the same images"
        )
    for column, title in (("deletion_curve", "mean deletion curve"), ("insertion_curve", "mean insertion curve")):
        series = {}
        for n, run in enumerate(runs):
            matrix = _curve_matrix(run, column)
            if matrix.size:
                method = run.metadata.get("task_options", {}).get("method", "?")
                series[f"{n + 1}. {method}"] = (np.linspace(0, 1, matrix.shape[1]), matrix.mean(axis=0))
        if series:
            s.figures.append(plots.curves(series, title, "fraction of pixels", "score of the explained target"))
    return s


# ----------------------------------------------------------------------------
# select-data
# ----------------------------------------------------------------------------


def select_data(run: Run) -> list[Section]:
    rows = run.table.select([c for c in run.table.column_names if c != "map"]).to_pylist()
    reasons = Counter(r.get("reason") or "-" for r in rows).most_common()
    s = Section("Selection")
    s.figures.append(plots.bars([r for r, _ in reasons], [n for _, n in reasons], "why each image is in or out"))
    report = run.metadata.get("selection_report") or {}
    comparison = report.get("comparison")
    if isinstance(comparison, dict) and comparison:
        names = sorted({k for side in comparison.values() if isinstance(side, dict) for k in side})
        s.tables.append(
            {
                "head": ["subset", *names],
                "rows": [
                    [
                        side,
                        *(_f(values.get(k), 4) if isinstance(values.get(k), float) else values.get(k) for k in names),
                    ]
                    for side, values in comparison.items()
                    if isinstance(values, dict)
                ],
            }
        )
        s.notes.append("coverage: distance from each pool image to the subset (lower is better); diversity: spread")
    threshold = (run.metadata.get("task_options") or {}).get("dedup_threshold")
    similarities = [r["duplicate_similarity"] for r in rows if r.get("duplicate_similarity") is not None]
    if similarities:
        s.figures.append(
            plots.histogram(
                similarities,
                "similarity of each dropped copy to its kept image",
                "cosine",
                {"threshold": threshold} if threshold is not None else None,
            )
        )
    by_path = {r["path"]: r for r in rows}
    groups: dict[int, list[dict]] = {}
    for r in rows:
        if r.get("duplicate_group") is not None:
            groups.setdefault(r["duplicate_group"], []).append(r)
    largest = sorted(groups.values(), key=len, reverse=True)[:4]
    for members in largest:
        copies = [m for m in members if m.get("duplicate_of")]
        kept = by_path.get(copies[0]["duplicate_of"]) if copies else None
        cards = [_card(run, kept, "kept")] if kept else []
        cards += [_card(run, m, f"similarity {_f(m['duplicate_similarity'])}") for m in copies[: run.per_gallery]]
        s.galleries.append(_gallery(f"duplicate group ({len(members)} images)", cards))
    if threshold is not None:
        s.tables.append(_threshold_explorer(rows, float(threshold)))
        compared = [r for r in rows if r.get("nearest_similarity") is not None and r.get("reason") != "exact_duplicate"]
        above = sorted(
            (r for r in compared if r["nearest_similarity"] > threshold), key=lambda r: r["nearest_similarity"]
        )
        below = sorted(
            (r for r in compared if r["nearest_similarity"] <= threshold), key=lambda r: -r["nearest_similarity"]
        )
        pairs = max(1, run.per_gallery // 2) if run.per_gallery else 0
        for title, chosen, verdict in (
            ("pairs just above the threshold (dropped)", above[:pairs], "dropped"),
            ("pairs just below the threshold (both kept)", below[:pairs], "kept"),
        ):
            cards = []
            for r in chosen:
                cards.append(_card(run, r, f"{verdict}: {_f(r['nearest_similarity'])} to the next"))
                other = by_path.get(r["nearest_path"])
                if other is not None:
                    cards.append(_card(run, other, "its nearest ranked before it"))
            s.galleries.append(_gallery(title, cards))
    return [s]


def _threshold_explorer(rows: list[dict], threshold: float) -> dict:
    """Near duplicates each candidate --dedup-threshold drops: exact for the run's clusters, since
    SemDeDup drops an image exactly when its nearest higher-priority image is above the threshold."""
    values = np.asarray(
        [
            r["nearest_similarity"]
            for r in rows
            if r.get("nearest_similarity") is not None and r.get("reason") != "exact_duplicate"
        ],
        dtype=np.float64,
    )
    candidates = sorted(
        {round(min(1.0, max(-1.0, threshold + d)), 3) for d in (-0.15, -0.1, -0.05, -0.02, 0, 0.02, 0.04)}
    )
    table: dict[str, list] = {
        "head": ["--dedup-threshold", "near duplicates dropped", "of the images compared"],
        "rows": [],
    }
    for candidate in candidates:
        mark = " (this run)" if abs(candidate - threshold) < 5e-4 else ""
        table["rows"].append([f"{candidate:.3f}{mark}", int((values > candidate).sum()), int(values.size)])
    return table


# ----------------------------------------------------------------------------
# detect-aigi
# ----------------------------------------------------------------------------


def detect_aigi_score(run: Run) -> list[Section]:
    rows = _light_rows(run)
    s = Section("Detection")
    threshold = (run.metadata.get("task_options") or {}).get("threshold")
    s.figures.append(
        plots.histogram(
            [r.get("p_fake") for r in rows],
            "calibrated p_fake",
            "p_fake",
            {"threshold": threshold} if threshold is not None else None,
        )
    )
    labels = Counter(r.get("label") for r in rows).most_common()
    s.figures.append(plots.bars([str(label) for label, _ in labels], [n for _, n in labels], "labels"))
    ranked = sorted((r for r in rows if r.get("p_fake") is not None), key=lambda r: r["p_fake"])
    s.galleries.append(
        _gallery(
            "most confident fakes",
            [_card(run, r, f"p_fake {_f(r['p_fake'])}", overlay=True) for r in ranked[::-1][: run.per_gallery]],
        )
    )
    s.galleries.append(
        _gallery(
            "most confident reals", [_card(run, r, f"p_fake {_f(r['p_fake'])}") for r in ranked[: run.per_gallery]]
        )
    )
    return [s]


def detect_aigi_eval(run: Run) -> list[Section]:
    rows = run.table.to_pylist()
    s = Section("Detector evaluation per generator")
    head = ["generator", "n_real", "n_fake", "AP", "AUROC", "acc@0.5", "acc@threshold", "real acc", "fake acc"]
    keys = ["generator", "n_real", "n_fake", "ap", "auroc", "acc_at_0_5", "acc_at_threshold", "real_acc", "fake_acc"]
    s.tables.append(
        {
            "head": head,
            "rows": [[_f(r.get(k)) if isinstance(r.get(k), float) else r.get(k) for k in keys] for r in rows],
        }
    )
    named = [r for r in rows if r.get("ap") is not None]
    if named:
        s.figures.append(
            plots.bars([r["generator"] for r in named], [r["ap"] for r in named], "AP", "average precision")
        )
    s.notes.append(f"threshold {run.metadata.get('threshold')}; detector {run.metadata.get('detector')}")
    for warning in run.metadata.get("confound_warnings") or []:
        s.notes.append(f"confound: {warning}")
    figures = run.metadata.get("figures") or {}
    curves = figures.get("curves") or {}
    if curves:
        s.figures.append(
            plots.curves(
                {g: (c["roc"]["fpr"], c["roc"]["tpr"]) for g, c in curves.items()},
                "ROC per generator",
                "false positive rate (reals called fake)",
                "true positive rate (fakes called fake)",
            )
        )
        s.figures.append(
            plots.curves(
                {g: (c["pr"]["recall"], c["pr"]["precision"]) for g, c in curves.items()},
                "precision-recall per generator",
                "recall",
                "precision",
            )
        )
    bins = figures.get("reliability") or []
    if bins:
        s.figures.append(
            plots.curves(
                {
                    "perfect calibration": ([0.0, 1.0], [0.0, 1.0]),
                    "this detector": ([b["predicted"] for b in bins], [b["observed"] for b in bins]),
                },
                "reliability (all images)",
                "mean predicted p_fake in the bin",
                "share of fakes in the bin",
            )
        )
    matrix = figures.get("confusion")
    if matrix:
        s.tables.append(
            {
                "head": [f"at threshold {matrix['threshold']:.3f}", "called fake", "called real"],
                "rows": [
                    ["fake", matrix["fake_called_fake"], matrix["fake_called_real"]],
                    ["real", matrix["real_called_fake"], matrix["real_called_real"]],
                ],
            }
        )
    for key, title in (
        ("most_confident_fakes", "most confident fakes"),
        ("most_confident_reals", "most confident reals"),
        ("worst_errors", "worst errors"),
    ):
        examples = (figures.get(key) or [])[: run.per_gallery]
        if examples:
            s.galleries.append(
                _gallery(
                    title,
                    [_card(run, e, f"{e['label']} ({e['generator']})", f"p_fake {_f(e['p_fake'])}") for e in examples],
                )
            )
    if figures:
        s.notes.append(
            "the eval scores images without heatmaps; `detect-aigi score --heatmaps DIR` draws them for any of these"
        )
    return [s]


# ----------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------


def quantize(run: Run) -> list[Section]:
    rows = run.table.to_pylist()
    meta = run.metadata
    s = Section("Quantization")
    figures = {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rows"}
    s.tables.append(
        {
            "head": ["figure", "value"],
            "rows": [[k, f"{v:.6g}" if isinstance(v, float) else v] for k, v in figures.items()],
        }
    )
    layers = [r for r in rows if r.get("output_error") is not None]
    if layers:
        ordered = sorted(layers, key=lambda r: r["output_error"], reverse=True)[:20]
        s.figures.append(
            plots.bars(
                [r["layer"] for r in ordered],
                [r["output_error"] for r in ordered],
                "output error per layer (20 largest)",
                "relative output error",
            )
        )
    kept = [r for r in rows if str(r.get("kind") or "").startswith("kept")]
    s.tables.append(
        {
            "head": ["layer", "kind", "method", "weight error", "output error"],
            "rows": [
                [
                    r.get("layer"),
                    r.get("kind"),
                    r.get("method") or "-",
                    _f(r.get("weight_error"), 5),
                    _f(r.get("output_error"), 5),
                ]
                for r in rows[:200]
            ],
        }
    )
    if kept:
        s.notes.append(f"{len(kept)} layers kept in full precision (the kind column says why)")
    return [s]


BUILDERS = {
    "classify": classify,
    "clip-score": clip_score,
    "saliency": saliency,
    "select-data": select_data,
    "detect-aigi": detect_aigi_score,
    "detect-aigi-eval": detect_aigi_eval,
    "quantize": quantize,
}
