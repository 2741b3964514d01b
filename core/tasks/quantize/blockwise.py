"""Calibrate and quantize a model block by block, so that memory stays bounded.

A *chain* is a list of blocks where each block's output is the next block's
input: open_clip's ``resblocks`` (image and text towers), timm's ViT
``blocks``, and EfficientNet-style ``blocks`` whose stages are flattened into
their blocks. :func:`quantize_chain` captures the calibration inputs of the
first block once, then for each block in turn:

1. runs the block over those inputs with hooks that gather its layers'
   input statistics (per-channel mean magnitude and a bounded sample of
   rows) and which tensors they read (layers that read the same tensor form
   one scale group; a LayerNorm whose output is that tensor can absorb the
   group's scales);
2. quantizes the block's layers (RTN; GPTQ on the sampled rows; AWQ: the
   alpha search of every scale group measured on the block's own output,
   then folding each group's scales into the LayerNorm before it or into the
   value rows of the attention's q/k/v projection where the block's output
   shows the fold is exact (otherwise an explicit input scale), then the
   optional clip search and the rounding);
3. feeds the block's output to the next block: full precision for AWQ and
   RTN (as AutoAWQ), the quantized block's output for GPTQ (the GPTQ paper's
   sequential mode: each block corrects for the error of those before it).

Only one block's statistics are alive at a time; the chain's activations are
held once (inputs and outputs of the current block). A chain whose blocks do
not pass their output straight to the next block is detected on the first
batch and its layers fall back to the one-pass path (``calibrate`` +
``quantize_layer``).

Over 400 lines on purpose: one algorithm (capture a block's inputs, choose and quantize its layers,
feed the next block) whose steps share their state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from visbatch.core.models import LoadedModel
from visbatch.core.tasks.quantize.awq import awq_quantize, search_scale

# Chains by container path; a container's children that are nn.Sequential are flattened.
CHAIN_CONTAINERS = ("visual.transformer.resblocks", "transformer.resblocks", "visual.trunk.blocks", "blocks")
AWQ_SEARCH_SAMPLES = 32  # inputs (images or texts) on which the alpha search measures the block output
FOLD_TOLERANCE = 1e-3  # relative RMS change of the block output that a fold may cause (float rounding only)


class _Captured(Exception):
    """Stops the forward pass once the chain's first block has its input."""


@dataclass
class Chain:
    container: str
    blocks: list[tuple[str, nn.Module]]
    tower: str  # "text" for a CLIP text tower, else "visual"


def find_chains(model: LoadedModel, targets) -> tuple[list[Chain], list]:
    """(chains holding targets, targets outside every chain)."""
    chains: list[Chain] = []
    inside: set[str] = set()
    for container_name in CHAIN_CONTAINERS:
        try:
            container = model.module.get_submodule(container_name)
        except AttributeError:
            continue
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        if any(
            container_name.startswith(c.container + ".") or c.container.startswith(container_name + ".") for c in chains
        ):
            continue
        blocks = []
        for index, child in enumerate(container):
            name = f"{container_name}.{index}"
            if isinstance(child, nn.Sequential):
                blocks += [(f"{name}.{j}", grandchild) for j, grandchild in enumerate(child)]
            else:
                blocks.append((name, child))
        names = {t.name for t in targets if t.name.startswith(container_name + ".")}
        if len(blocks) < 2 or not names:
            continue
        inside |= names
        tower = model.adapter.tower_of(container_name)
        chains.append(Chain(container_name, blocks, tower))
    return chains, [t for t in targets if t.name not in inside]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_chain_inputs(chain: Chain, drive) -> list[tuple[tuple, dict]] | None:
    """(args, kwargs) of the first block for every calibration batch; ``drive`` runs the model over
    the batches. None when the chain does not pass each block's output to the next block."""
    first = chain.blocks[0][1]
    captured: list[tuple[tuple, dict]] = []
    seen: dict[int, torch.Tensor] = {}
    checking = [True]

    def grab(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        if not checking[0]:
            raise _Captured

    def record(index):
        def hook(module, args, kwargs):
            if checking[0]:
                seen[index] = args[0] if args else next(iter(kwargs.values()))

        return hook

    for run in drive():  # one batch unhooked first: lazy decisions (the text tower's trim check) run once
        run()
        break
    handles = [first.register_forward_pre_hook(grab, with_kwargs=True)]
    handles += [
        block.register_forward_pre_hook(record(i), with_kwargs=True) for i, (_, block) in enumerate(chain.blocks)
    ]
    try:
        for run in drive():
            try:
                run()
            except _Captured:
                pass
            checking[0] = False
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        return None
    # The first batch went through every block: replay it along the chain and compare.
    args, kwargs = captured[0]
    x = args[0]
    for index, (_, block) in enumerate(chain.blocks):
        if index in seen and (
            not isinstance(x, torch.Tensor)
            or x.shape != seen[index].shape
            or not torch.allclose(x, seen[index], rtol=1e-4, atol=1e-5)
        ):
            return None
        x = _first(block(x, *args[1:], **kwargs))
    return captured


@dataclass
class _Observation:
    stats: dict = field(default_factory=dict)  # target name -> ActivationStats
    groups: list[list] = field(default_factory=list)  # targets reading the same tensor
    norm_of_group: dict[int, tuple[str, nn.Module]] = field(default_factory=dict)  # group index -> LayerNorm


def _observe(
    block_name: str, block: nn.Module, targets, inputs, generator, outputs: list, want_hessian: bool = False
) -> _Observation:
    from visbatch.core.tasks.quantize import ActivationStats, _input_of, register_input_hook

    observation = _Observation({t.name: ActivationStats(want_hessian) for t in targets})
    first_batch: dict[str, torch.Tensor] = {}
    norm_outputs: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    recording = [True]
    for target in targets:

        def hook(raw, target=target):
            if recording[0]:
                first_batch[target.name] = raw  # held, so no tensor id is reused while grouping
            observation.stats[target.name].add(_input_of(target, (raw,)), generator)

        handles.append(register_input_hook(target, hook))
    for name, module in block.named_modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:

            def norm_hook(mod, args, output, name=name):
                if recording[0]:
                    norm_outputs.append((f"{block_name}.{name}", mod, output))

            handles.append(module.register_forward_hook(norm_hook))
    try:
        for args, kwargs in inputs:
            outputs.append(_first(block(*args, **kwargs)))
            recording[0] = False
    finally:
        for handle in handles:
            handle.remove()
    for target in targets:
        if target.name not in first_batch:
            continue
        for group in observation.groups:
            if first_batch[group[0].name] is first_batch[target.name]:
                group.append(target)
                break
        else:
            observation.groups.append([target])
    for index, group in enumerate(observation.groups):
        for norm_name, norm, output in norm_outputs:
            if output is first_batch[group[0].name]:
                observation.norm_of_group[index] = (norm_name, norm)
    return observation


@contextlib.contextmanager
def _replaced(changes):
    """Parameters temporarily replaced by ``changes`` [(parameter, new value)], restored on exit."""
    saved = [(parameter, parameter.detach().clone()) for parameter, _ in changes]
    try:
        for parameter, value in changes:
            parameter.data.copy_(value.reshape(parameter.shape).to(parameter.device, parameter.dtype))
        yield
    finally:
        for parameter, value in saved:
            parameter.data.copy_(value)


def _block_error(block, inputs, references) -> float:
    total, energy = 0.0, 0.0
    for (args, kwargs), reference in zip(inputs, references):
        output = _first(block(*args, **kwargs)).float()
        total += float((output - reference.float()).pow(2).sum())
        energy += float(reference.float().pow(2).sum())
    return total / max(energy, 1e-12)


def _search_inputs(inputs, outputs):
    taken, count = [], 0
    for pair, output in zip(inputs, outputs):
        taken.append((pair, output))
        count += pair[0][0].shape[0] if pair[0][0].dim() else 1
        if count >= AWQ_SEARCH_SAMPLES:
            break
    return [p for p, _ in taken], [o for _, o in taken]


@torch.no_grad()
def quantize_chain(
    chain: Chain,
    targets,
    inputs,
    bits: int,
    group_size: int | None,
    method: str,
    act_order: bool = False,
    awq_clip: bool = True,
    validation=None,
    root: nn.Module | None = None,
) -> tuple[list, dict[str, torch.Tensor]]:
    """Quantize the ``targets`` inside ``chain`` block by block from the first block's captured
    ``inputs``. Returns (QuantizedLayer list, parameter overrides {name: tensor} for folded
    LayerNorms).

    ``method="auto"``: each block is quantized with every method (RTN, AWQ, GPTQ, calibrated on
    ``inputs``) and keeps the one whose block output error on ``validation`` (the first block's
    inputs for images held out of the calibration, run along the full-precision chain) is
    lowest, RTN winning ties; ``root`` is the model the overrides' names refer to."""
    from visbatch.core.tasks.quantize import quantize_layer

    generator = torch.Generator().manual_seed(0)
    layers, overrides = [], {}
    for block_name, block in chain.blocks:
        block_targets = [t for t in targets if t.name.startswith(block_name + ".")]
        outputs: list[torch.Tensor] = []
        observation = _observe(
            block_name, block, block_targets, inputs, generator, outputs, want_hessian=method in ("gptq", "auto")
        )
        if method == "auto":
            chosen, chosen_overrides, validation = _choose_block(
                block,
                block_targets,
                observation,
                inputs,
                outputs,
                validation,
                root,
                bits,
                group_size,
                act_order,
                awq_clip,
            )
            layers += chosen
            overrides.update(chosen_overrides)
            if chosen and chosen[0].method == "gptq":
                outputs = _quantized_outputs(block, chosen, inputs)
        elif method != "awq":
            block_layers = [
                quantize_layer(t, bits, group_size, method, observation.stats[t.name], act_order) for t in block_targets
            ]
            layers += block_layers
            if method == "gptq":
                outputs = _quantized_outputs(block, block_layers, inputs)
        else:
            layers += _awq_block(
                block, block_targets, observation, inputs, outputs, bits, group_size, awq_clip, overrides
            )
        inputs = [((output,) + args[1:], kwargs) for (args, kwargs), output in zip(inputs, outputs)]
    return layers, overrides


def _choose_block(
    block, block_targets, observation, inputs, outputs, validation, root, bits, group_size, act_order, awq_clip
):
    """Every method for one block; the one with the lowest validation block-output error.
    Returns (layers, overrides, the validation inputs of the next block)."""
    from visbatch.core.tasks.quantize import effective_weight, quantize_layer

    references = [_first(block(*args, **kwargs)) for args, kwargs in validation]
    candidates = {}
    for method in ("rtn", "gptq"):
        candidates[method] = (
            [quantize_layer(t, bits, group_size, method, observation.stats[t.name], act_order) for t in block_targets],
            {},
        )
    awq_overrides: dict[str, torch.Tensor] = {}
    candidates["awq"] = (
        _awq_block(block, block_targets, observation, inputs, outputs, bits, group_size, awq_clip, awq_overrides),
        awq_overrides,
    )
    best = None
    for method in ("rtn", "awq", "gptq"):  # RTN first: it wins ties
        block_layers, block_overrides = candidates[method]
        changes = [
            (_weight_parameter(layer.target), effective_weight(layer.weight, layer.column_scale))
            for layer in block_layers
        ]
        changes += [(root.get_parameter(name), value) for name, value in block_overrides.items()]
        with _replaced(changes):
            error = _block_error(block, validation, references)
        if best is None or error < best[0]:
            best = (error, method)
    layers, chosen_overrides = candidates[best[1]]
    for layer in layers:
        layer.method, layer.validation_error = best[1], best[0]
    next_validation = [((reference,) + args[1:], kwargs) for (args, kwargs), reference in zip(validation, references)]
    return layers, chosen_overrides, next_validation


def _quantized_outputs(block, block_layers, inputs) -> list[torch.Tensor]:
    """The block's outputs with its layers quantized: GPTQ's sequential mode, where each block is
    calibrated on what the already-quantized blocks before it produce."""
    from visbatch.core.tasks.quantize import effective_weight

    with _replaced(
        [
            (_weight_parameter(layer.target), effective_weight(layer.weight, layer.column_scale))
            for layer in block_layers
        ]
    ):
        return [_first(block(*args, **kwargs)) for args, kwargs in inputs]


def _awq_block(block, block_targets, observation, inputs, outputs, bits, group_size, awq_clip, overrides) -> list:
    """AWQ for one block, in AutoAWQ's order: search every scale group's alpha on the block
    output (the other groups in full precision), fold the scales where the block output shows the
    fold is exact, then clip and quantize every layer."""
    from visbatch.core.tasks.quantize import QuantizedLayer, _output_error, feeds_softmax, quantize_layer

    search_in, search_out = _search_inputs(inputs, outputs)
    originals = {t.name: t.weight().float().cpu().clone() for t in block_targets}
    plans = []
    for index, group in enumerate(observation.groups):

        def evaluate(effective, group=group):
            with _replaced([(_weight_parameter(t), w) for t, w in zip(group, effective)]):
                return _block_error(block, search_in, search_out)

        magnitude = observation.stats[group[0].name].mean_abs().float().cpu()
        alpha, scale, _ = search_scale([originals[t.name] for t in group], magnitude, bits, group_size, evaluate)
        plans.append(
            {
                "group": group,
                "alpha": alpha,
                "scale": scale,
                "folded_into": None,
                "norm": observation.norm_of_group.get(index),
            }
        )
    for plan in plans:
        if plan["alpha"]:
            _fold(block, block_targets, plan, originals, search_in, search_out, overrides)
    layers = []
    for plan in plans:
        scale = plan["scale"]
        for target in plan["group"]:
            w, rows = originals[target.name], observation.stats[target.name].sample().float()
            quantized, effective = awq_quantize(
                w, scale, rows, bits, group_size, awq_clip and not feeds_softmax(target)
            )
            original = target.weight().float().cpu()  # errors against the unfolded model
            effective = _unfold(effective, target, plans)
            layers.append(
                QuantizedLayer(
                    target,
                    quantized,
                    None if plan["folded_into"] else 1 / scale,
                    plan["alpha"],
                    float((effective - original).norm() / original.norm().clamp(min=1e-12)),
                    _output_error(original, effective, rows),
                    folded_into=plan["folded_into"],
                    method="awq",
                    calibration_rows=observation.stats[target.name].count,
                )
            )
    for target in block_targets:  # never reached by the block's forward: plain rounding
        if all(target is not t for plan in plans for t in plan["group"]):
            layers.append(quantize_layer(target, bits, group_size, "rtn", observation.stats[target.name]))
    return layers


def _value_producer(target, block_targets):
    """The layer whose value rows produce ``target``'s input: an attention's output projection
    reads softmax-weighted values, linear in the value rows of the packed q/k/v projection."""
    parent, _, leaf = target.name.rpartition(".")
    for candidate in block_targets:
        if leaf == "out_proj" and candidate.kind == "mha_in_proj" and candidate.name == parent:
            return candidate
        if leaf == "proj" and candidate.kind == "linear" and candidate.name == f"{parent}.qkv":
            return candidate
    return None


def _value_bias(producer):
    return producer.module.in_proj_bias if producer.kind == "mha_in_proj" else producer.module.bias


def _fold(block, block_targets, plan, originals, search_in, search_out, overrides) -> None:
    """Fold ``plan``'s scales into the LayerNorm before it or into the value rows of the
    attention's q/k/v projection, if the block's output stays the same; record the result."""
    scale, group = plan["scale"], plan["group"]
    changes = [(_weight_parameter(t), originals[t.name] * scale.view(1, -1)) for t in group]
    if plan["norm"] is not None:
        norm_name, norm = plan["norm"]
        folded = [(norm.weight, norm.weight.detach().float().cpu() / scale)]
        if norm.bias is not None:
            folded.append((norm.bias, norm.bias.detach().float().cpu() / scale))
        if _keeps_block_output(block, changes + folded, search_in, search_out):
            overrides[f"{norm_name}.weight"] = folded[0][1].to(norm.weight.dtype)
            if norm.bias is not None:
                overrides[f"{norm_name}.bias"] = folded[1][1].to(norm.bias.dtype)
            plan["folded_into"] = norm_name
        return
    producer = _value_producer(group[0], block_targets) if len(group) == 1 else None
    if producer is None:
        return
    width = scale.numel()
    values = originals[producer.name].clone()
    if values.shape[0] != 3 * width:
        return
    values[2 * width :] /= scale.view(-1, 1)
    folded = [(_weight_parameter(producer), values)]
    bias = _value_bias(producer)
    if bias is not None:
        new_bias = bias.detach().float().cpu().clone()
        new_bias[2 * width :] /= scale
        folded.append((bias, new_bias))
    if _keeps_block_output(block, changes + folded, search_in, search_out):
        originals[producer.name] = values  # the q/k/v projection is quantized with its value rows scaled
        if bias is not None:
            name = f"{producer.name}.in_proj_bias" if producer.kind == "mha_in_proj" else f"{producer.name}.bias"
            overrides[name] = new_bias.to(bias.dtype)
        plan["folded_into"] = f"{producer.name} (value rows)"
        plan["unfold_rows"] = (producer.name, width)


def _unfold(effective, target, plans):
    """The effective weight in the original model's terms, for the error columns of the report
    (a LayerNorm fold needs nothing: ``Q(W s) / s`` is already in the original input's terms)."""
    for other in plans:  # this layer's value rows hold another group's folded scale
        if other.get("unfold_rows", (None,))[0] == target.name:
            width = other["unfold_rows"][1]
            effective = effective.clone()
            effective[2 * width :] *= other["scale"].view(-1, 1)
    return effective


def _weight_parameter(target):
    return target.module.in_proj_weight if target.kind == "mha_in_proj" else target.module.weight


def _keeps_block_output(block, changes, search_in, search_out) -> bool:
    """Whether the block's output on the search inputs stays the same (up to float rounding)
    with the parameters replaced by ``changes`` [(parameter, new value)]."""
    with _replaced(changes):
        return _block_error(block, search_in, search_out) <= FOLD_TOLERANCE**2
