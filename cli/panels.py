"""Help panels: every subcommand's options in the same groups, in the same order.

``visbatch CMD --help`` shows Inputs, Model, Output, Run, Engine, then the subcommand's
own options (a panel named after it), then Help. An option is placed by its name here,
so a new shared option needs one line in :data:`PANEL_OF`; an option not named here is
the subcommand's own.
"""

from __future__ import annotations

from typer.core import TyperGroup

INPUTS, MODEL, OUTPUT, RUN, ENGINE, HELP = "Inputs", "Model", "Output", "Run", "Engine", "Help"
PANEL_ORDER = (INPUTS, MODEL, OUTPUT, RUN, ENGINE)  # then the subcommand's own panel, then Help

PANEL_OF = {
    # what is read
    "inputs": INPUTS,
    "manifest": INPUTS,
    "recursive": INPUTS,
    "glob": INPUTS,
    "limit": INPUTS,
    "shard": INPUTS,
    "max_pixels": INPUTS,
    "image_column": INPUTS,
    "keep_columns": INPUTS,
    "calib": INPUTS,
    "calib_limit": INPUTS,
    "calib_prompts": INPUTS,
    "calib_captions": INPUTS,
    "captions": INPUTS,
    "references": INPUTS,
    "labels_file": INPUTS,
    "root": INPUTS,
    "real": INPUTS,
    "fake": INPUTS,
    "eval_images": INPUTS,
    "parts": INPUTS,
    "results": INPUTS,
    # the model
    "model": MODEL,
    "pretrained": MODEL,
    "device": MODEL,
    "precision": MODEL,
    "runtime": MODEL,
    "detector": MODEL,
    # what is written
    "output": OUTPUT,
    "overwrite": OUTPUT,
    "resume": OUTPUT,
    "report": OUTPUT,
    "html_report": OUTPUT,
    "hash": OUTPUT,
    "overlays": OUTPUT,
    "overlay_size": OUTPUT,
    "colormap": OUTPUT,
    "alpha": OUTPUT,
    "overlay_style": OUTPUT,
    "save_maps": OUTPUT,
    "heatmaps": OUTPUT,
    "save_probs": OUTPUT,
    "save_embeddings": OUTPUT,
    "save_mirrored": OUTPUT,
    "copy_to_option": OUTPUT,
    "link_to_option": OUTPUT,
    "link": OUTPUT,
    "shards_option": OUTPUT,
    "shard_size": OUTPUT,
    "allow_partial": OUTPUT,
    "max_images": OUTPUT,
    # how the run behaves
    "batch_size": RUN,
    "workers": RUN,
    "fail_on_error": RUN,
    "json": RUN,
    "as_json": RUN,
    "quiet": RUN,
    "print_selected": RUN,
    # where the map stage runs
    "engine": ENGINE,
    "ray_address": ENGINE,
    "gpus_per_worker": ENGINE,
    "concurrency": ENGINE,
}


def plain_flags(params) -> None:
    """A flag takes no value: show no ``<bool>`` type beside it (Typer prints one for every
    option without a metavar; an empty one prints nothing)."""
    for param in params:
        if getattr(param, "is_flag", False) and not getattr(param, "metavar", None):
            param.metavar = ""


def own_panel(command_name: str) -> str:
    return f"{command_name} options"


def group(command) -> None:
    """Give each of a click command's parameters its panel and order them by panel (Typer
    prints panels in the order their first parameter comes). An option a subcommand sets a
    panel for itself keeps it."""
    own = own_panel(command.name or "command")
    rank = {panel: n for n, panel in enumerate(PANEL_ORDER)}
    for param in command.params:
        if getattr(param, "rich_help_panel", None) is None:
            param.rich_help_panel = PANEL_OF.get(param.name or "", own)
    # by panel; within Output, -o first; otherwise as declared (sort is stable)
    command.params.sort(key=lambda p: (rank.get(p.rich_help_panel, len(PANEL_ORDER)), p.name != "output"))
    plain_flags(command.params)


class PlainFlagsGroup(TyperGroup):
    """A command group whose own flags (``--help``, ``--version``) show no ``<bool>``."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        plain_flags(params)
        return params
