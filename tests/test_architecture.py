"""ARCHITECTURE.md's "to add X, touch Y" table, checked: a saliency method and a select-data
strategy added through their registries alone run from the CLI."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pyarrow.parquet as pq
import torch

from conftest import REPO, VISBATCH, invoke_cli


def test_a_saliency_method_is_one_function_and_one_registry_entry(monkeypatch, fixture_images, tmp_path):
    from visbatch.core.tasks.saliency import methods

    def centre_weighted(forward, images, targets, **_):
        """A map that peaks at the image centre, whatever the model says."""
        b, _, h, w = images.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return methods.Attribution(maps=(1 - (yy**2 + xx**2) / 2).expand(b, h, w).to(images.device).float())

    monkeypatch.setitem(
        methods.METHODS,
        "centre",
        methods.MethodSpec(centre_weighted, "centre-weighted map (test)", signed=False, gradient_based=False),
    )
    out = tmp_path / "s.parquet"
    result = invoke_cli(
        "saliency",
        fixture_images,
        "--model",
        "test-tiny-cnn",
        "--method",
        "centre",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--map-size",
        "8",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert rows and all(r["status"] == "ok" for r in rows)
    saliency = np.asarray(rows[0]["map"]).reshape(8, 8)
    assert saliency[3:5, 3:5].mean() > saliency[0, 0]


def test_a_strategy_is_one_function_and_one_registry_entry(monkeypatch, fixture_images, tmp_path):
    from visbatch.core.tasks import select

    def last_in_path_order(fill):
        m = fill.pool.shape[0]
        return np.arange(m)[::-1][: fill.budget].copy(), None

    monkeypatch.setitem(select.STRATEGIES, "last", select.Strategy(last_in_path_order, "the last paths (test)"))
    out = tmp_path / "m.parquet"
    result = invoke_cli(
        "select-data",
        fixture_images,
        "--model",
        "test-tiny-clip",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--strategy",
        "last",
        "--budget",
        "1",
        "--no-dedup",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    selected = [r["path"] for r in rows if r["selected"]]
    assert selected == [sorted(r["path"] for r in rows)[-1]]
    assert json.loads(result.stdout.strip().splitlines()[-1])["selected"] == 1


def test_nothing_outside_the_adapters_branches_on_the_model_family():
    found = subprocess.run(
        ["grep", "-rnE", r"family (==|!=)", "core", "cli"], cwd=REPO, capture_output=True, text=True
    ).stdout.splitlines()
    assert [line for line in found if not line.startswith("core/models/")] == []


def test_core_imports_no_task():
    found = subprocess.run(
        ["grep", "-rnE", r"(from|import) visbatch\.core\.tasks", "core", "--include=*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert [line for line in found if not line.startswith("core/tasks/")] == []


def test_method_parameters_match_their_cli_options():
    """Each registered method parameter is set by a saliency option with the same default."""
    import inspect

    from visbatch.cli.saliency import saliency
    from visbatch.core.tasks.saliency.methods import METHOD_PARAMETERS, METHODS

    options = {}
    for parameter in inspect.signature(saliency).parameters.values():
        info = parameter.default
        for flag in getattr(info, "param_decls", None) or ():
            options[flag] = info.default
    for name, spec in METHOD_PARAMETERS.items():
        assert options.get(spec.option) == spec.default, (name, spec.option)
    assert {p for spec in METHODS.values() for p in spec.parameters} <= set(METHOD_PARAMETERS)


def test_every_declared_method_parameter_reaches_its_function():
    """A parameter a registry entry declares is one its function takes: nothing is silently dropped."""
    import inspect

    from visbatch.core.tasks.saliency.methods import METHODS

    for name, spec in METHODS.items():
        accepted = inspect.signature(spec.function).parameters
        forwards_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        for parameter in spec.parameters:
            assert parameter in accepted or forwards_all, (name, parameter)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the visbatch modules it imports (any import statement, at any depth: a lazy
    import inside a function is an arrow too)."""
    import ast

    modules = {}
    for top, package in (("core", "visbatch.core"), ("cli", "visbatch.cli")):
        for path in (REPO / top).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO / top).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        package = package.rsplit(".", 1)[0]
                    base = package + ("." + base if base else "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_circle():
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert circles == []
    # the loop knows engines only by their interface, and the CLI reaches core, never the reverse
    assert {m for m in graph["visbatch.core.pipeline"] if m.startswith("visbatch.core.engines")} == {
        "visbatch.core.engines"
    }
    assert not [
        m for m in graph if m.startswith("visbatch.core") and any(t.startswith("visbatch.cli") for t in graph[m])
    ]


def test_an_engine_is_one_module(monkeypatch, fixture_images, tmp_path):
    """A third engine (here: one image per batch, in this process) is a module with
    open_engine(), named in ENGINE_MODULES; the loop needs nothing else, and the rows equal local's."""
    import sys
    import types

    from visbatch.core import engines
    from visbatch.core.batches import (
        OverlayLook,
        batch_tally,
        make_loader,
        observe,
        process_batch,
        settle,
        summary_rows,
    )

    class OneAtATime:
        said = "one image at a time, in this process"

        def start(self, run):
            self.run_ = run
            return {"engine": "one-at-a-time"}

        def run(self, items, offset, commit, stop):
            r = self.run_
            for item in items:
                for batch in make_loader([item], r.model, r.config, geometry=getattr(r.task, "geometry", None)):
                    pending = process_batch(
                        r.task, r.model, batch, r.overlay_sink, r.map_sink, OverlayLook.of(r.config), r.multi_root
                    )
                    rows = settle(pending)
                    r.writer.write_rows(rows)
                    commit(engines.Committed(*batch_tally(rows)))
                    observe(r.task, summary_rows(r.task, rows))
                if stop():
                    return

        def finish(self, commit):
            pass

        def decode(self, items, model, config):
            return make_loader(items, model, config)

    module = types.ModuleType("one_at_a_time_engine")
    module.open_engine = lambda options: OneAtATime()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "one_at_a_time_engine", module)
    monkeypatch.setitem(engines.ENGINE_MODULES, "one-at-a-time", "one_at_a_time_engine")
    common = ["--model", "test-tiny-cnn", "--device", "cpu", "--workers", "0", "--batch-size", "3"]
    local, other = tmp_path / "local.parquet", tmp_path / "other.parquet"
    assert invoke_cli("classify", fixture_images, *common, "-o", local).exit_code == 0
    result = invoke_cli("classify", fixture_images, *common, "--engine", "one-at-a-time", "-o", other)
    assert result.exit_code == 0, result.output
    assert "engine: one image at a time, in this process" in result.output
    a, b = pq.read_table(local).to_pylist(), pq.read_table(other).to_pylist()
    assert len(a) == len(b) >= 4
    for x, y in zip(a, b):
        assert (x["path"], x["status"], x["top_indices"]) == (y["path"], y["status"], y["top_indices"])
        assert max(abs(p - q) for p, q in zip(x["top_probs"], y["top_probs"])) < 1e-5
    meta = json.loads(pq.read_schema(other).metadata[b"visbatch"])
    assert meta["engine"] == {"engine": "one-at-a-time"}


def _commands():
    import typer.main

    from visbatch.cli.main import app

    def walk(command, path):
        children = getattr(command, "commands", None)
        if children:
            for name, child in children.items():
                yield from walk(child, [*path, name])
        else:
            yield " ".join(path), command

    yield from walk(typer.main.get_command(app), [])


def test_every_option_of_every_subcommand_is_in_a_panel_in_one_order():
    from visbatch.cli.panels import HELP, PANEL_ORDER, own_panel

    commands = dict(_commands())
    assert {"classify", "saliency", "clip-score", "select-data", "quantize", "merge", "report"} <= set(commands)
    for name, command in commands.items():
        panels = [getattr(p, "rich_help_panel", None) for p in command.params]
        assert None not in panels, (name, [p.name for p in command.params if not getattr(p, "rich_help_panel", None)])
        allowed = [*PANEL_ORDER, own_panel(command.name), HELP]
        assert set(panels) <= set(allowed), (name, set(panels) - set(allowed))
        seen = list(dict.fromkeys(panels))
        assert seen == sorted(seen, key=allowed.index), (name, seen)  # Inputs, Model, Output, Run, Engine, own


def test_every_help_page_shows_its_panels_in_one_order():
    """The rendered pages (Typer draws arguments apart from options): Inputs first, Help last."""
    from visbatch.cli.panels import HELP, PANEL_ORDER, own_panel

    for name, command in _commands():
        page = invoke_cli(*name.split(), "--help", env={"COLUMNS": "200"}).output
        allowed = [*PANEL_ORDER, own_panel(command.name), HELP]
        titles = re.findall(r"╭─ (.+?) ─", page)
        shown = list(dict.fromkeys(titles))
        assert set(shown) <= set(allowed), (name, shown)
        assert shown == sorted(shown, key=allowed.index), (name, shown)
        assert "<bool>" not in page, name


def test_help_is_grouped_and_version_is_a_flag():
    import os

    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([*VISBATCH, "select-data", "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    heads = [
        p for p in ("Inputs", "Model", "Output", "Run", "Engine", "select-data options") if f"─ {p} " in result.stdout
    ]
    assert heads == ["Inputs", "Model", "Output", "Run", "Engine", "select-data options"], result.stdout[:2000]
    top = subprocess.run([*VISBATCH, "--help"], capture_output=True, text=True, env=env)
    assert "--version" in top.stdout and "<bool>" not in top.stdout
    assert "--install-completion" in top.stdout
