"""ARCHITECTURE.md's "to add X, touch Y" table, checked: a saliency method and a select-data
strategy added through their registries alone run from the CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import torch

from conftest import REPO, invoke_cli


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
